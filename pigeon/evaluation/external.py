"""Pigeon's own metric list (the paper's §5.1 metrics), run only on local weights.

No registry package ships CLIP, DINOv2, the FID Inception or LPIPS weights, and nothing is
downloaded here, so each encoder runs only when its flag points at local files; otherwise the
report lists its metrics as skipped with the reason.

    --clip DIR        a transformers CLIP folder (config.json, model.safetensors, tokenizer files)
                      -> CLIPScore (100 * max(cos(image, text), 0)), CLIP-I (vs ground truth),
                         Hist CLIP-I (mean over the history), Hist CLIP-I (s_u) (history items in s_u)
    --dinov2 DIR      a transformers DINOv2 folder (safetensors) -> DINO-I, Hist DINO-I, Hist DINO-I (s_u)
    --inception FILE  an ONNX graph of the FID Inception: float (N, 3, H, W) RGB in [0, 1] -> pool3
                      features (N, 2048[, 1, 1]) -> FID (generated vs ground-truth set)
    --lpips FILE      an ONNX graph of LPIPS: two float (N, 3, H, W) in [-1, 1] -> (N[, 1, 1, 1])
                      -> Hist LPIPS (mean over the history)
Hist SSIM needs no weights and is always computed (pigeon.evaluation.evaluate).

Weights load without unpickling: transformers with `use_safetensors=True` (a folder with only a
pytorch_model.bin is refused), ONNX Runtime for the ONNX graphs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pigeon.evaluation.errors import EvaluationError

EXTERNAL_METRICS = {
    "clip": ("clip_score", "clip_i", "hist_clip_i", "hist_clip_i_style"),
    "dinov2": ("dino_i", "hist_dino_i", "hist_dino_i_style"),
    "inception": ("fid",),
    "lpips": ("hist_lpips",),
}
FLAGS = {
    "clip": "--clip DIR",
    "dinov2": "--dinov2 DIR",
    "inception": "--inception FILE.onnx",
    "lpips": "--lpips FILE.onnx",
}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ExternalError(EvaluationError):
    """Local weights that cannot be used; the message names the path."""


def _pixels(images: np.ndarray, size: int, mean, std):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - m) / s


def _norm_stats(folder: Path, mean, std) -> tuple[tuple, tuple]:
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        return tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return mean, std


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _pooled(out):
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFClip:
    """CLIP image and text embeddings from a local transformers folder."""

    name = "clip"

    def __init__(self, folder: str | Path, batch: int = 64) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.folder = Path(folder)
        _check_folder(self.folder, "--clip")
        try:
            self.model = CLIPModel.from_pretrained(
                self.folder, local_files_only=True, use_safetensors=True
            ).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ExternalError(f"--clip {self.folder}: cannot load a CLIP model ({exc})") from None
        self.size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = _norm_stats(self.folder, CLIP_MEAN, CLIP_STD)
        self.batch = batch

    def embed(self, images: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch):
                x = _pixels(images[i : i + self.batch], self.size, self.mean, self.std)
                out.append(_pooled(self.model.get_image_features(pixel_values=x)).numpy())
        return _unit(np.concatenate(out))

    def embed_text(self, texts: list[str]) -> np.ndarray:
        import torch

        limit = int(self.model.config.text_config.max_position_embeddings)
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch):
                tok = self.tokenizer(
                    texts[i : i + self.batch],
                    padding=True,
                    truncation=True,
                    max_length=limit,
                    return_tensors="pt",
                )
                feats = self.model.get_text_features(
                    input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask")
                )
                out.append(_pooled(feats).numpy())
        return _unit(np.concatenate(out))


class HFDino:
    """DINOv2 CLS embeddings (the layer-normed pooler output) from a local transformers folder."""

    name = "dinov2"

    def __init__(self, folder: str | Path, batch: int = 64) -> None:
        from transformers import AutoModel

        self.folder = Path(folder)
        _check_folder(self.folder, "--dinov2")
        try:
            self.model = AutoModel.from_pretrained(
                self.folder, local_files_only=True, use_safetensors=True
            ).eval()
        except (OSError, ValueError) as exc:
            raise ExternalError(f"--dinov2 {self.folder}: cannot load a model ({exc})") from None
        self.size = int(getattr(self.model.config, "image_size", 224))
        self.mean, self.std = _norm_stats(self.folder, IMAGENET_MEAN, IMAGENET_STD)
        self.batch = batch

    def embed(self, images: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch):
                x = _pixels(images[i : i + self.batch], self.size, self.mean, self.std)
                o = self.model(pixel_values=x)
                pooled = getattr(o, "pooler_output", None)
                out.append((pooled if pooled is not None else o.last_hidden_state[:, 0]).numpy())
        return _unit(np.concatenate(out))


class OnnxGraph:
    """An ONNX Runtime session on a local file; spatial size from the graph (or a default)."""

    def __init__(self, path: str | Path, flag: str, default_size: int, inputs: int) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ExternalError(f"{flag} {self.path}: file not found")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ExternalError(f"{flag} {self.path}: not a loadable ONNX graph ({exc})") from None
        ins = self.session.get_inputs()
        if len(ins) != inputs:
            raise ExternalError(f"{flag} {self.path}: expected {inputs} input(s), found {len(ins)}")
        self.names = [i.name for i in ins]
        h = ins[0].shape[2] if len(ins[0].shape) == 4 else None
        self.size = h if isinstance(h, int) else default_size
        static_batch = ins[0].shape[0]
        self.batch = static_batch if isinstance(static_batch, int) else 32

    def prepare(self, images: np.ndarray, low: float) -> np.ndarray:
        from pigeon.evaluation.metrics import resize_images

        x = resize_images(np.asarray(images), self.size).astype(np.float32) / 255.0
        x = np.transpose(x, (0, 3, 1, 2))  # (N, H, W, 3) -> (N, 3, H, W)
        return x * 2 - 1 if low < 0 else x


class OnnxInception(OnnxGraph):
    name = "inception"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, "--inception", 299, 1)

    def embed(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch):
            x = self.prepare(images[i : i + self.batch], 0.0)
            y = self.session.run(None, {self.names[0]: x})[0]
            out.append(y.reshape(len(x), -1))  # (N, d, 1, 1) -> (N, d)
        return np.concatenate(out).astype(np.float64)


class OnnxLpips(OnnxGraph):
    name = "lpips"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, "--lpips", 64, 2)

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(a), self.batch):
            xa, xb = (
                self.prepare(a[i : i + self.batch], -1),
                self.prepare(b[i : i + self.batch], -1),
            )
            y = self.session.run(None, {self.names[0]: xa, self.names[1]: xb})[0]
            out.append(y.reshape(len(xa)))
        return np.concatenate(out).astype(np.float64)


def _check_folder(folder: Path, flag: str) -> None:
    if not folder.is_dir():
        raise ExternalError(f"{flag} {folder}: no such folder")
    if not any(folder.glob("*.safetensors")):
        raise ExternalError(
            f"{flag} {folder}: no *.safetensors weights (pickled .bin files are not loaded; "
            "convert them with transformers' save_pretrained(safe_serialization=True))"
        )


@dataclass
class External:
    """The encoders that loaded, and {metric: reason} for every metric that will not run."""

    clip: HFClip | None = None
    dinov2: HFDino | None = None
    inception: OnnxInception | None = None
    lpips: OnnxLpips | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def load_external(
    clip: str | None = None,
    dinov2: str | None = None,
    inception: str | None = None,
    lpips: str | None = None,
) -> External:
    """Load what was given; a given path that fails to load is an error, a missing one a skip."""
    ext = External()
    given = {"clip": clip, "dinov2": dinov2, "inception": inception, "lpips": lpips}
    loaders = {"clip": HFClip, "dinov2": HFDino, "inception": OnnxInception, "lpips": OnnxLpips}
    for key, path in given.items():
        if not path:
            for metric in EXTERNAL_METRICS[key]:
                ext.skipped[metric] = (
                    f"no local {key} weights (pass {FLAGS[key]}; nothing is downloaded)"
                )
            continue
        setattr(ext, key, loaders[key](path))
        ext.sources[key] = str(path)
    return ext


def external_scores(
    ext: External,
    generated: np.ndarray,
    truth: np.ndarray,
    histories: list[np.ndarray],
    in_style: list[np.ndarray],
    texts: list[str],
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per-case metrics {name: (N,)} and set-level feature pairs {name: (generated, truth)}.

    histories[i]: uint8 (L_i, H, W, 3); in_style[i]: bool (L_i,), the items shown in s_u."""
    per: dict[str, np.ndarray] = {}
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    lengths = [len(h) for h in histories]
    bounds = np.cumsum([0, *lengths])
    flat_history = np.concatenate(histories) if histories else np.zeros((0,) + truth.shape[1:])

    def history_means(g: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        all_, own = [], []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            sims = h[a:b] @ g[i]
            all_.append(sims.mean())
            own.append(sims[in_style[i]].mean() if in_style[i].any() else np.nan)
        return np.asarray(all_), np.asarray(own)

    for key, prefix in (("clip", "clip"), ("dinov2", "dino")):
        enc = getattr(ext, key)
        if enc is None:
            continue
        g, t, h = enc.embed(generated), enc.embed(truth), enc.embed(flat_history)
        per[f"{prefix}_i"] = (g * t).sum(1)
        per[f"hist_{prefix}_i"], per[f"hist_{prefix}_i_style"] = history_means(g, h)
        if key == "clip":
            per["clip_score"] = 100 * np.maximum((g * ext.clip.embed_text(texts)).sum(1), 0)
    if ext.inception is not None:
        sets["fid"] = (ext.inception.embed(generated), ext.inception.embed(truth))
    if ext.lpips is not None:
        rep = np.repeat(generated, lengths, axis=0)
        d = ext.lpips.distance(rep, flat_history)
        per["hist_lpips"] = np.array(
            [d[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        )
    return per, sets
