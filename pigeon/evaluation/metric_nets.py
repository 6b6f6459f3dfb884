"""Frozen metric networks trained on EmojiPrefs training-split concepts only.

    StyleNet    a K-way style classifier                      -> StyleAcc, StyleMargin, Hist-sim
    ConceptNet  a cross-style concept embedding (SupCon loss:  -> ConceptR@1/R@5/MRR, GT-sim, FD/KID
                the same concept in other styles is positive)

Both are small CNNs (MetricCNN). They never see a validation or test concept, and share no weights
with the generator. Weights are safetensors; beside each file a JSON record holds the config, the
seed, the exact training command, the dataset's content hash and the net's own accuracy on the
test concepts (with the style confusion matrix), so results stay comparable across versions.

Train (a few minutes on a 2-core CPU; deterministic for a given seed and thread count):

    python -m pigeon.evaluation.metric_nets train --data data/emojiprefs --out pigeon/evaluation/weights
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pigeon.evaluation import metrics as M
from pigeon.evaluation.errors import EvaluationError
from pigeon.evaluation.options import WEIGHTS_DIR

log = logging.getLogger(__name__)

KINDS = ("style", "concept")


class MetricNetError(EvaluationError):
    """Metric-net weights that cannot be used; the message names the file or the value."""


@dataclass(frozen=True, kw_only=True)
class MetricNetConfig:
    """One metric net: architecture, the styles it knows, and how it was trained."""

    kind: Literal["style", "concept"]
    styles: tuple[str, ...]
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 96, 128)
    convs_per_block: int = 1
    embed_dim: int = 128  # concept embedding size (concept nets)
    steps: int = 350
    batch_size: int = 64  # style nets: images per step
    batch_concepts: int = 16  # concept nets: concepts per step, each shown in `views` styles
    views: int = 4
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    temperature: float = 0.1  # SupCon temperature
    label_smoothing: float = 0.1
    augment: bool = True
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MetricNetError(f"kind={self.kind!r} is not one of {list(KINDS)}")
        if len(self.styles) < 2:
            raise MetricNetError(f"styles={list(self.styles)} needs at least 2 styles")
        if self.image_size < 2 ** len(self.channels):
            raise MetricNetError(
                f"image_size={self.image_size} is too small for {len(self.channels)} blocks"
            )
        if self.kind == "concept" and not 2 <= self.views <= len(self.styles):
            raise MetricNetError(f"views={self.views} must be in [2, {len(self.styles)}]")


class MetricCNN(nn.Module):
    """Conv blocks (conv-BN-ReLU, max-pool) -> [mean, max] pooled features -> a linear head:
    style logits (style nets) or an embedding (concept nets)."""

    def __init__(self, config: MetricNetConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 3
        for c in config.channels:
            for _ in range(config.convs_per_block):
                layers += [
                    nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                ]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*layers)
        self.feature_dim = 2 * c_in
        out = len(config.styles) if config.kind == "style" else config.embed_dim
        self.head = nn.Linear(self.feature_dim, out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> pooled features (B, 2 * C)."""
        h = self.trunk((x - 0.5) / 0.5)  # (B, C, S', S')
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Style logits (B, K), or unit concept embeddings (B, embed_dim)."""
        out = self.head(self.features(x))
        return out if self.config.kind == "style" else F.normalize(out, dim=1)


def to_input(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [0, 1] (bilinear, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).permute(0, 3, 1, 2)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return x.clamp_(0, 1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift/scale on white, random down-and-up resampling (the blur of a low-resolution
    generator), pixel noise. (B, 3, S, S) -> same."""
    b, _, s, _ = x.shape
    scale = torch.empty(b).uniform_(0.85, 1.1, generator=g)
    shift = torch.empty(b, 2).uniform_(-0.08, 0.08, generator=g)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = 1 - F.grid_sample(1 - x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    low = torch.rand(b, generator=g) < 0.5
    if low.any():
        size = int([s * 3 // 8, s // 2, s * 3 // 4][int(torch.randint(3, (1,), generator=g))])
        part = F.interpolate(x[low], size=(size, size), mode="bilinear", antialias=True)
        x = x.clone()
        x[low] = F.interpolate(part, size=(s, s), mode="bilinear", align_corners=False)
    sigma = torch.empty(b, 1, 1, 1).uniform_(0, 0.03, generator=g)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over unit embeddings z (B, d)."""
    sim = z @ z.t() / temperature  # (B, B)
    self_mask = torch.eye(len(z), dtype=torch.bool)
    sim = sim.masked_fill(self_mask, -1e9)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    return -(log_prob * pos).sum(1).div(pos.sum(1).clamp(min=1)).mean()


def _lr(step: int, config: MetricNetConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class TrainResult:
    net: MetricCNN
    config: MetricNetConfig
    seconds: float
    final_loss: float


def train_metric_net(
    rgb: np.ndarray, train_concepts: Sequence[int], config: MetricNetConfig, log_every: int = 50
) -> TrainResult:
    """Train one net on rgb[train_concepts] (uint8 (C, K, H, W, 3)); nothing else is read."""
    if rgb.shape[1] != len(config.styles):
        raise MetricNetError(f"images have {rgb.shape[1]} styles, config has {len(config.styles)}")
    train_concepts = np.asarray(train_concepts)
    if config.kind == "concept" and len(train_concepts) < config.batch_concepts:
        raise MetricNetError(
            f"only {len(train_concepts)} training concepts for batch_concepts="
            f"{config.batch_concepts}"
        )
    if len(train_concepts) == 0:
        raise MetricNetError("no training concepts")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = MetricCNN(config)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    k = len(config.styles)
    start = time.perf_counter()
    loss_avg = float("nan")
    net.train()
    for step in range(config.steps):
        if config.kind == "style":
            concepts = rng.choice(train_concepts, config.batch_size)
            styles = rng.integers(0, k, config.batch_size)
            labels = torch.from_numpy(styles)
        else:
            concepts = np.repeat(
                rng.choice(train_concepts, config.batch_concepts, replace=False), config.views
            )
            styles = np.concatenate(
                [rng.choice(k, config.views, replace=False) for _ in range(config.batch_concepts)]
            )
            labels = torch.from_numpy(concepts)
        x = to_input(rgb[concepts, styles], config.image_size)
        if config.augment:
            x = augment(x, g)
        out = net(x)
        if config.kind == "style":
            loss = F.cross_entropy(out, labels, label_smoothing=config.label_smoothing)
        else:
            loss = supcon_loss(out, labels, config.temperature)
        for group in opt.param_groups:
            group["lr"] = _lr(step, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        loss_avg = value if step == 0 else 0.95 * loss_avg + 0.05 * value
        if log_every and (step + 1) % log_every == 0:
            log.info(
                "%s net step %d/%d loss %.4f (%.1f s)",
                config.kind,
                step + 1,
                config.steps,
                loss_avg,
                time.perf_counter() - start,
            )
    net.eval()
    return TrainResult(net, config, time.perf_counter() - start, loss_avg)


# --- inference ------------------------------------------------------------------------------------


@torch.no_grad()
def run_net(net: MetricCNN, images: np.ndarray, what: str = "out", batch: int = 256) -> np.ndarray:
    """Batched inference on uint8 (N, H, W, 3): 'out' (logits / embeddings) or 'features'."""
    net.eval()
    outs = []
    for i in range(0, len(images), batch):
        x = to_input(images[i : i + batch], net.config.image_size)
        outs.append((net.features(x) if what == "features" else net(x)).numpy())
    if not outs:
        dim = net.feature_dim if what == "features" else net.head.out_features
        return np.zeros((0, dim), np.float32)
    return np.concatenate(outs)


def degrade(images: np.ndarray, size: int) -> np.ndarray:
    """Down to `size` px (box) and back up (bicubic): what a lower-resolution generator gives."""
    full = images.shape[1]
    return M.resize_images(M.resize_images(images, size, box=True), full)


def style_report(net: MetricCNN, rgb: np.ndarray, concepts: Sequence[int]) -> dict:
    """Accuracy per style and confusion matrix on rgb[concepts] (every style), also after a
    round trip through half resolution."""
    k = rgb.shape[1]
    images = rgb[np.asarray(concepts)].reshape(-1, *rgb.shape[2:])  # (C*K, H, W, 3)
    true = np.tile(np.arange(k), len(concepts))
    out = {}
    for name, x in (("full", images), ("half", degrade(images, rgb.shape[2] // 2))):
        pred = run_net(net, x).argmax(1)
        cm = M.confusion_matrix(true, pred, k)
        per_style = cm.diagonal() / np.maximum(cm.sum(1), 1)
        out[name] = {
            "accuracy": float((pred == true).mean()),
            "per_style": {
                s: round(float(a), 4) for s, a in zip(net.config.styles, per_style, strict=True)
            },
            "confusion": cm.tolist(),
        }
    return {
        "concepts": len(concepts),
        "accuracy": out["full"]["accuracy"],
        "per_style": out["full"]["per_style"],
        "confusion_matrix": {
            "rows": "true style",
            "columns": "predicted style",
            "styles": list(net.config.styles),
            "counts": out["full"]["confusion"],
        },
        "accuracy_half_resolution": out["half"]["accuracy"],
        "per_style_half_resolution": out["half"]["per_style"],
    }


def concept_report(net: MetricCNN, rgb: np.ndarray, concepts: Sequence[int], seed: int = 0) -> dict:
    """Retrieval among `concepts`: cross-style R@1 (query in style a, gallery in style b, mean over
    ordered pairs) and the evaluation's prototype retrieval (query in style s; prototypes leave out
    s and one random other style), at full and half resolution."""
    c, k = len(concepts), rgb.shape[1]
    images = rgb[np.asarray(concepts)].reshape(-1, *rgb.shape[2:])  # (C*K, H, W, 3)
    rng = np.random.default_rng(seed)
    exclude = np.zeros((c * k, k), bool)
    exclude[np.arange(c * k), np.tile(np.arange(k), c)] = True
    own = np.tile(np.arange(k), c)
    other = (own + rng.integers(1, k, c * k)) % k
    exclude[np.arange(c * k), other] = True
    target = np.repeat(np.arange(c), k)
    out = {}
    for name, x in (("full", images), ("half", degrade(images, rgb.shape[2] // 2))):
        e = run_net(net, x).reshape(c, k, -1)  # (C, K, d)
        pair = np.zeros((k, k))
        for a in range(k):
            for b in range(k):
                if a != b:
                    sims = M.normalize(e[:, a]) @ M.normalize(e[:, b]).T
                    pair[a, b] = (M.ranks_of_targets(sims, np.arange(c)) == 1).mean()
        full_gallery = run_net(net, images).reshape(c, k, -1)  # gallery always at full resolution
        ranks = M.prototype_ranks(e.reshape(c * k, -1), full_gallery, target, exclude)
        scores = M.retrieval_scores(ranks)
        out[name] = {
            "cross_style_r1": float(pair.sum() / (k * (k - 1))),
            "cross_style_r1_by_pair": np.round(pair, 4).tolist(),
            "prototype_r1": float(scores["r1"].mean()),
            "prototype_r5": float(scores["r5"].mean()),
            "prototype_mrr": float(scores["rr"].mean()),
        }
    return {
        "concepts": c,
        "chance_r1": 1 / c,
        **out["full"],
        "half_resolution": {key: v for key, v in out["half"].items() if "by_pair" not in key},
    }


# --- save / load ----------------------------------------------------------------------------------


def save_metric_net(result: TrainResult, out: Path, record: dict) -> Path:
    """Write `<kind>_net.safetensors` (config in the metadata) and `<kind>_net.json` (the record)."""
    from safetensors.torch import save_file

    from pigeon.config import to_dict
    from pigeon.files import write_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{result.config.kind}_net"
    state = {k: v.detach().contiguous().cpu() for k, v in result.net.state_dict().items()}
    config_json = json.dumps(to_dict(result.config))
    tmp = out / f".{name}.tmp.safetensors"
    save_file(state, tmp, metadata={"config": config_json})
    tmp.chmod(0o644)
    tmp.replace(out / f"{name}.safetensors")
    from pigeon.files import sha256_file

    record = {
        "config": to_dict(result.config),
        "weights": f"{name}.safetensors",
        "weights_sha256": sha256_file(out / f"{name}.safetensors"),
        "parameters": sum(p.numel() for p in result.net.parameters()),
        "train_seconds": round(result.seconds, 1),
        "final_loss": round(result.final_loss, 4),
        **record,
    }
    write_atomic(out / f"{name}.json", json.dumps(record, indent=1) + "\n")
    return out / f"{name}.safetensors"


def load_metric_net(folder: Path, kind: str) -> tuple[MetricCNN, dict]:
    """(net in eval mode, its JSON record); never unpickles. Errors name the missing/bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pigeon.config import ConfigError, from_dict
    from pigeon.files import sha256_file

    folder = Path(folder)
    meta_path, weights = folder / f"{kind}_net.json", folder / f"{kind}_net.safetensors"
    for p in (meta_path, weights):
        if not p.is_file():
            raise MetricNetError(
                f"{p}: not found; train the metric nets with `python -m "
                f"pigeon.evaluation.metric_nets train --data DIR --out {folder}`"
            )
    try:
        record = json.loads(meta_path.read_text())
        config = from_dict(MetricNetConfig, record["config"], where=str(meta_path))
    except (json.JSONDecodeError, KeyError, ConfigError) as exc:
        raise MetricNetError(f"{meta_path}: bad metric-net record ({exc})") from None
    if config.kind != kind:
        raise MetricNetError(f"{meta_path}: kind={config.kind!r}, expected {kind!r}")
    if record.get("weights_sha256") and sha256_file(weights) != record["weights_sha256"]:
        raise MetricNetError(f"{weights}: SHA-256 does not match {meta_path.name}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise MetricNetError(f"{weights}: unreadable ({exc})") from None
    net = MetricCNN(config)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MetricNetError(f"{weights}: weights do not fit the config ({exc})") from None
    return net.eval(), record


@dataclass
class MetricNets:
    """The frozen pair used by the evaluation."""

    style: MetricCNN
    concept: MetricCNN
    records: dict[str, dict]

    @property
    def styles(self) -> list[str]:
        return list(self.style.config.styles)

    @classmethod
    def load(cls, folder: str | Path = WEIGHTS_DIR) -> MetricNets:
        style, rs = load_metric_net(Path(folder), "style")
        concept, rc = load_metric_net(Path(folder), "concept")
        if style.config.styles != concept.config.styles:
            raise MetricNetError(
                f"{folder}: style net styles {list(style.config.styles)} differ from concept "
                f"net styles {list(concept.config.styles)}"
            )
        return cls(style, concept, {"style": rs, "concept": rc})

    def style_probs(self, images: np.ndarray) -> np.ndarray:
        return torch.softmax(torch.from_numpy(run_net(self.style, images)), dim=1).numpy()

    def style_features(self, images: np.ndarray) -> np.ndarray:
        return run_net(self.style, images, "features")

    def concept_embeddings(self, images: np.ndarray) -> np.ndarray:
        return run_net(self.concept, images)

    def concept_features(self, images: np.ndarray) -> np.ndarray:
        return run_net(self.concept, images, "features")


# --- command line -----------------------------------------------------------------------------


def train_and_save(
    data: str | Path,
    out: str | Path,
    which: Sequence[str] = KINDS,
    *,
    seed: int = 0,
    threads: int = 1,
    steps: dict[str, int] | None = None,
    command: str = "",
) -> dict:
    """Train the requested nets on the train split of an EmojiPrefs folder, report them on the
    test split, save them; returns {kind: record}."""
    from pigeon.data.emojiprefs import load_emojiprefs

    ds = load_emojiprefs(data)
    info_path = Path(data) / "dataset.json"
    data_hash = (
        json.loads(info_path.read_text()).get("content_sha256") if info_path.is_file() else None
    )
    train, test = ds.split_index["train"], ds.split_index["test"]
    if not train or not test:
        raise MetricNetError(f"{data}: needs train and test concepts, got {len(train)}/{len(test)}")
    records = {}
    for kind in which:
        config = MetricNetConfig(
            kind=kind, styles=tuple(ds.styles), image_size=ds.size, seed=seed, threads=threads
        )
        if steps and kind in steps:
            config = replace(config, steps=steps[kind])
        result = train_metric_net(ds.rgb, train, config)
        test_report = (style_report if kind == "style" else concept_report)(
            result.net, ds.rgb, test
        )
        record = {
            "command": command,
            "seed": seed,
            "data": {"root": str(data), "content_sha256": data_hash, "train_concepts": len(train)},
            "torch": torch.__version__,
            "test": test_report,
        }
        save_metric_net(result, Path(out), record)
        records[kind] = record
        log.info("%s net: %s", kind, json.dumps(_headline(kind, test_report)))
    return records


def _headline(kind: str, report: dict) -> dict:
    keys = (
        ("accuracy", "accuracy_half_resolution", "per_style")
        if kind == "style"
        else ("cross_style_r1", "prototype_r1", "prototype_r5", "chance_r1")
    )
    return {k: report[k] for k in keys}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m pigeon.evaluation.metric_nets")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the frozen metric nets on the train split")
    p.add_argument("--data", required=True, help="an EmojiPrefs folder")
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    p.add_argument("--which", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    p.add_argument("--style-steps", type=int, default=None)
    p.add_argument("--concept-steps", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    steps = {k: v for k, v in (("style", args.style_steps), ("concept", args.concept_steps)) if v}
    command = " ".join(["python -m pigeon.evaluation.metric_nets", *argv])
    try:
        records = train_and_save(
            args.data,
            args.out,
            args.which,
            seed=args.seed,
            threads=args.threads,
            steps=steps,
            command=command,
        )
    except (MetricNetError, OSError, ValueError) as exc:
        print(f"metric_nets: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: _headline(k, r["test"]) for k, r in records.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
