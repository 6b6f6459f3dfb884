"""`pigeon evaluate --data USER_DATA`: the metrics that need no per-style ground truth, on a user-data
folder's windows (`pigeon.data.user_data`).

Each window is asked as the paper's official code asks it: the history's last `max_history` items, the
target item as the reference (a window has no other), its caption as the text. Per window (mean and
percentile-bootstrap 95% interval over windows):

    target_sim    cosine of EfficientNet-Lite0 pooled features, generated vs the target
    history_sim   the same, generated vs each history image, averaged over the history
    ssim          SSIM of generated vs the target (at the data's image size)

Per set (generated images vs the split's targets; bootstrap over windows): `fd_enl0`, `kid_enl0`.

StyleAcc, ConceptR@k and copy detection need what only EmojiPrefs has (each user's style label, the
concept gallery, the metric nets trained on them); the report lists them as skipped, with why.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pigeon.evaluation import metrics as M
from pigeon.evaluation.errors import EvaluationError

WINDOW_METRICS = ("target_sim", "history_sim", "ssim")
SET_METRICS = ("fd_enl0", "kid_enl0")
SKIPPED_METRICS = {
    "style_acc": "needs each user's style label and the StyleNet trained on EmojiPrefs",
    "concept_r1": "needs the concept gallery and the ConceptNet trained on EmojiPrefs",
    "concept_r5": "needs the concept gallery and the ConceptNet trained on EmojiPrefs",
    "copy_rate": "needs the history's concepts to tell a copy from a new drawing",
}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) features."""
    return np.sum(M.normalize(a) * M.normalize(b), axis=-1)


def window_scores(
    generated: np.ndarray,
    targets: np.ndarray,
    generated_features: np.ndarray,
    target_features: np.ndarray,
    history_features: list[np.ndarray],
) -> dict[str, np.ndarray]:
    """Per-window target_sim, history_sim and ssim. Images uint8 (N, S, S, 3); features (N, D), and
    one (n_history, D) array per window for the history."""
    history_sim = np.array(
        [
            float(np.mean(M.normalize(h) @ M.normalize(g)))
            for g, h in zip(generated_features, history_features, strict=True)
        ]
    )
    return {
        "target_sim": cosine_rows(generated_features, target_features),
        "history_sim": history_sim,
        "ssim": M.ssim(generated, targets),
    }


def is_user_data(source: str | Path | None) -> bool:
    from pigeon.data.user_data import INTERACTIONS_FILE, ITEMS_FILE

    path = Path(str(source or ""))
    return (path / ITEMS_FILE).is_file() and (path / INTERACTIONS_FILE).is_file()


def command(args) -> dict:
    """`pigeon evaluate --data USER_DATA` (argparse namespace from pigeon.cli) -> the summary."""
    from pigeon.evaluation.evaluate import request_fields
    from pigeon.evaluation.methods import check_request_fields, resolve_model_specs

    if not args.checkpoint:
        raise EvaluationError(
            "--data USER_DATA needs --checkpoint (a run folder or one checkpoint)"
        )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    request = request_fields(args)
    check_request_fields(request)
    specs, skipped = resolve_model_specs(args.checkpoint, ["pigeon"], request=request)
    if not specs:
        raise EvaluationError(f"--checkpoint {args.checkpoint}: {skipped['pigeon']}")
    report = evaluate_user_data(
        specs[0].checkpoint,
        args.data,
        args.out,
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        batch=args.batch,
        bootstrap=args.bootstrap,
        enl0_size=args.enl0_size,
        request=request,
        overrides=args.set or [],
    )
    return {
        "out": str(args.out),
        "windows": report["windows"],
        "metrics": {k: round(v["mean"], 4) for k, v in report["metrics"].items()},
        "skipped_metrics": sorted(report["skipped_metrics"]),
        "skipped_methods": "every method but pigeon: baselines and ablations need EmojiPrefs",
    }


def evaluate_user_data(
    checkpoint: str | Path,
    root: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch: int = 8,
    bootstrap: int = 1000,
    enl0_size: int = 224,
    request: dict | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Generate for every window of `split` (the first `limit`), score, write OUT/report.json."""
    from pigeon.checkpoint import load_checkpoint
    from pigeon.config import apply_overrides
    from pigeon.core.images import resize
    from pigeon.data.user_data import SPLIT_FRACTIONS, load_user_data
    from pigeon.evaluation.features import EfficientNetLite0, ENL0Config
    from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
    from pigeon.inference.runners import TorchRunner

    if split not in SPLIT_FRACTIONS:
        raise EvaluationError(f"--split {split!r} must be one of {', '.join(SPLIT_FRACTIONS)}")
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit {limit} must be >= 1")
    data = load_user_data(root)
    windows = data.splits[split][:limit]
    if len(windows) < 2:
        raise EvaluationError(
            f"--data {str(root)!r}: the {split} split has {len(windows)} window(s); "
            "FD and the intervals need at least 2"
        )
    ckpt = load_checkpoint(checkpoint)
    config = apply_overrides(ckpt.config, overrides) if overrides else ckpt.config
    pipe = PigeonPipeline(config, ckpt.tokenizer, TorchRunner(ckpt.model))
    size = config.image_size
    max_history = config.personalizer.max_history

    def image(item: str) -> np.ndarray:
        return resize(data.image(item), size)

    requests = [
        GenerationRequest(
            history=[image(i) for i in w.history[-max_history:]],
            reference=image(w.target),
            text=data.items[w.target].caption,
            seed=seed + n,
            **(request or {}),
        )
        for n, w in enumerate(windows)
    ]
    start = time.perf_counter()
    generated: list[np.ndarray] = []
    for j in tqdm(range(0, len(requests), batch), desc="generate", unit="batch"):
        generated += [r.image for r in pipe(requests[j : j + batch])]
    seconds = time.perf_counter() - start
    generated_images = np.stack([resize(g, size) for g in generated])
    targets = np.stack([r.reference for r in requests])
    enl0 = EfficientNetLite0(ENL0Config(image_size=enl0_size))
    g_feat, t_feat = enl0.pooled(generated_images), enl0.pooled(targets, cache=True)
    h_feat = [enl0.pooled(np.stack(r.history), cache=True) for r in requests]
    per_window = window_scores(generated_images, targets, g_feat, t_feat, h_feat)
    index = M.bootstrap_indices(len(windows), bootstrap, seed)
    results = {}
    for name, values in per_window.items():
        mean, low, high = M.bootstrap_mean_ci(values, index)
        results[name] = {"mean": mean, "low": low, "high": high}
    set_stats = {
        "fd_enl0": lambda rows: M.frechet_distance(g_feat[rows], t_feat[rows]),
        "kid_enl0": lambda rows: M.kid(g_feat, t_feat, index=rows),
    }
    for name, stat in set_stats.items():
        mean, low, high = M.bootstrap_stat_ci(stat, len(windows), index, floor=0.0)
        results[name] = {"mean": mean, "low": low, "high": high}
    report = {
        "data": str(root),
        "split": split,
        "windows": len(windows),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": ckpt.digest,
        "protocol": "history: the window's last items; reference: the target item; text: its caption",
        "metrics": results,
        "per_window": {k: [round(float(v), 6) for v in vals] for k, vals in per_window.items()},
        "skipped_metrics": SKIPPED_METRICS,
        "generate_seconds": round(seconds, 1),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from pigeon.files import write_atomic

    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report
