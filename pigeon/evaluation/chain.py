"""The image chain: where a checkpoint loses the user's style, link by link (`pigeon evaluate --chain`).

Every generated image passes through the same links, and each caps what the next can show:

    ground_truth     the target images themselves (the oracle: what StyleNet can see at all)
    vae_round_trip   the targets encoded and decoded by the VAE (the ceiling of every latent image)
    target_tokens    the UNet given the target's own kept tokens (an oracle personalizer: the
                     ceiling of the image half, tokenizer + condition adapter + UNet)
    history_tokens   the UNet given the last history image's tokens (the user's style, another
                     concept: what copying the history through the tokens would draw)
    generated        the personalizer's tokens: the model as served

The token links and `generated` run at strength 1.0 (pure noise) and at the checkpoint's strength,
with the requests' own seeds and the checkpoint's sampler, so the rows differ only by their tokens.
All rows are scored on the same users by the frozen StyleNet / ConceptNet of `pigeon evaluate`, with
paired 95% bootstrap intervals over users. If `target_tokens` is far above `generated`, the
personalizer misses; if it is near `vae_round_trip`, the image half is not what holds the style back.

The training loop logs one link per stage at validation (`TrainingLink`): the VAE stage its round
trip, the image and decoder stages `target_tokens` at strength 1.0, on fixed validation users.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pigeon.evaluation import metrics as M
from pigeon.evaluation.errors import EvaluationError

log = logging.getLogger("pigeon.evaluate")

LINKS = ("ground_truth", "vae_round_trip", "target_tokens", "history_tokens", "generated")
TOKEN_LINKS = ("target_tokens", "history_tokens", "generated")
SCORED = (("style_acc", "StyleAcc"), ("concept_r5", "ConceptR@5"))


def kept_codes(pipe, images: list[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """Each image's kept codes in raster order, as the personalizer is trained to emit them."""
    from pigeon.inference.pipeline import to_model_input

    size = pipe.config.history_encoder.image_size
    out = pipe.runner.run(
        "history_encoder", {"images": np.stack([to_model_input(i, size) for i in images])}
    )
    return [ids[keep > 0] for ids, keep in zip(out["token_ids"], out["token_keep"], strict=True)]


def draw(pipe, codes: list[np.ndarray], requests, strength: float) -> np.ndarray:
    """codes -> condition -> denoise (the requests' own latent streams) -> decode; uint8 images."""
    from pigeon.core.images import to_uint8
    from pigeon.inference.pipeline import request_streams

    checked = [pipe.check_request(r, i) for i, r in enumerate(requests)]
    cond = pipe.condition(codes)
    latents = pipe.denoise(
        cond["prompt_embeds"],
        cond["pooled_embeds"],
        checked[0].steps,
        checked[0].guidance,
        checked[0].sampler,
        [request_streams(r.seed)[2] for r in checked],
        pipe.reference_pixels(checked, strength),
        strength,
    )
    return to_uint8(pipe.runner.run("vae_decoder", {"latents": latents})["images"])


def round_trip(pipe, images: np.ndarray) -> np.ndarray:
    """uint8 images -> VAE encoder -> VAE decoder -> uint8 images at the model's size."""
    from pigeon.core.images import to_uint8
    from pigeon.inference.pipeline import to_model_input

    size = pipe.config.image_size
    x = np.stack([to_model_input(i, size) for i in images])
    latents = pipe.runner.run("vae_encoder", {"images": x})["latents"]
    return to_uint8(pipe.runner.run("vae_decoder", {"latents": latents})["images"])


def chain_images(
    pipe, data, cases, strengths: list[float], batch: int = 8, links=LINKS
) -> dict[str, np.ndarray]:
    """{row name: uint8 images at the data's size}; token rows are named `link@strength`."""
    from pigeon.evaluation.methods import evaluation_requests

    requests = evaluation_requests(data, cases, pipe.config)
    truth = data.truth(cases)
    rows: dict[str, np.ndarray] = {}
    if "ground_truth" in links:
        rows["ground_truth"] = truth
    if "vae_round_trip" in links:
        rows["vae_round_trip"] = np.concatenate(
            [round_trip(pipe, truth[i : i + batch]) for i in range(0, len(truth), batch)]
        )
    codes = {}
    if "target_tokens" in links:
        codes["target_tokens"] = kept_codes(pipe, truth)
    if "history_tokens" in links:
        codes["history_tokens"] = kept_codes(pipe, [r.history[-1] for r in requests])
    if "generated" in links:
        codes["generated"] = [
            c
            for i in range(0, len(requests), batch)
            for c in _generated(pipe, requests[i : i + batch])
        ]
    for strength in strengths:
        for name in (n for n in TOKEN_LINKS if n in codes):
            rows[f"{name}@{strength:g}"] = np.concatenate(
                [
                    draw(pipe, codes[name][i : i + batch], requests[i : i + batch], strength)
                    for i in range(0, len(requests), batch)
                ]
            )
    return {k: M.resize_images(v, data.size) for k, v in rows.items()}


def _generated(pipe, requests) -> list[np.ndarray]:
    return [r.tokens for r in pipe(requests)]


def score_rows(
    scorer, case_set, rows: dict[str, np.ndarray], bootstrap: int = 1000, seed: int = 0
) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {metric: {mean, low, high}}}: one seeded set of user resamples for every row, so the
    differences between rows are paired."""
    indices = M.bootstrap_indices(len(case_set.cases), bootstrap, seed)
    out = {}
    for name, images in rows.items():
        per, _, _ = scorer.score(images, case_set, light=True)
        out[name] = {}
        for key, _ in SCORED:
            mean, lo, hi = M.bootstrap_mean_ci(per[key], indices)
            out[name][key] = {"mean": mean, "low": lo, "high": hi}
    return out


def markdown(scores: dict, header: str) -> str:
    lines = [header, "", "| link | " + " | ".join(label for _, label in SCORED) + " |"]
    lines.append("|---|" + "---|" * len(SCORED))
    for name, row in scores.items():
        cells = [
            f"{row[k]['mean']:.3f} [{row[k]['low']:.3f}, {row[k]['high']:.3f}]" for k, _ in SCORED
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(scores: dict, path: Path) -> str | None:
    """A horizontal bar per row with its interval, StyleAcc and ConceptR@5 side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; chain.png not drawn (the table is in chain.md)"
    names = list(scores)
    fig, axes = plt.subplots(1, len(SCORED), figsize=(10, 0.4 * len(names) + 1.5), sharey=True)
    for ax, (key, label) in zip(axes, SCORED, strict=True):
        means = np.array([scores[n][key]["mean"] for n in names])
        err = np.array(
            [
                [scores[n][key]["mean"] - scores[n][key]["low"] for n in names],
                [scores[n][key]["high"] - scores[n][key]["mean"] for n in names],
            ]
        )
        ax.barh(range(len(names)), means, xerr=err, color="#4c72b0", capsize=3)
        ax.set_xlim(0, 1)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def command(args) -> dict:
    """`pigeon evaluate --chain` (argparse namespace from pigeon.cli) -> the JSON summary."""
    import torch

    from pigeon.evaluation.data import load_eval_data
    from pigeon.evaluation.evaluate import Scorer, default_data
    from pigeon.evaluation.external import External
    from pigeon.evaluation.methods import ModelRunner, resolve_model_specs
    from pigeon.evaluation.metric_nets import MetricNets

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.checkpoint:
        raise EvaluationError("--chain needs --checkpoint (a run folder or one checkpoint)")
    data_source = args.data or default_data(args.checkpoint)
    if not data_source:
        raise EvaluationError(
            "--data is needed (the checkpoint's run folder records no data folder)"
        )
    data = load_eval_data(data_source, args.split, seed=args.seed)
    if args.limit is not None:
        if args.limit < 1:
            raise EvaluationError(f"--limit {args.limit} must be >= 1")
        data.cases = data.cases[: args.limit]
    specs, skipped = resolve_model_specs(
        args.checkpoint,
        ("pigeon",),
        checkpoint_for={},
        overrides=args.set or [],
        request={},
        ratios=args.ratios,
        batch=args.batch,
    )
    if not specs:
        raise EvaluationError(f"--checkpoint {args.checkpoint}: {skipped.get('pigeon')}")
    ckpt, pipe = ModelRunner().pipeline(specs[0])
    shipped = pipe.config.scheduler.strength
    strengths = sorted({1.0, shipped, *(args.chain_strengths or [])}, reverse=True)
    links = tuple(args.chain_links or LINKS)
    unknown = [x for x in links if x not in LINKS]
    if unknown:
        raise EvaluationError(f"--chain-links {unknown[0]!r} is not one of {', '.join(LINKS)}")
    start = time.perf_counter()
    rows = chain_images(pipe, data, data.cases, strengths, batch=args.batch, links=links)
    scorer = Scorer(data, MetricNets.load(args.metric_nets), enl0=None, external=External())
    scores = score_rows(scorer, scorer.case_set(data.cases), rows, args.bootstrap, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Image chain: {specs[0].checkpoint} on {len(data.cases)} {args.split} users "
        f"(shipped strength {shipped:g}; 95% bootstrap intervals over users)"
    )
    (out / "chain.md").write_text(markdown(scores, header))
    report = {
        "checkpoint": str(specs[0].checkpoint),
        "checkpoint_sha256": ckpt.digest,
        "split": args.split,
        "users": len(data.cases),
        "strengths": strengths,
        "rows": scores,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "chain.json").write_text(json.dumps(report, indent=2) + "\n")
    note = plot(scores, out / "chain.png")
    if note:
        log.warning(note)
    log.info("\n%s", markdown(scores, header))
    return {
        "out": str(out),
        "users": len(data.cases),
        "seconds": report["seconds"],
        "style_acc": {k: round(v["style_acc"]["mean"], 4) for k, v in scores.items()},
        "concept_r5": {k: round(v["concept_r5"]["mean"], 4) for k, v in scores.items()},
    }


# --- the link a training stage logs at validation ------------------------------------------------


@dataclass
class TrainingLink:
    """The stage's own link of the chain on the first `users` validation users, StyleAcc and
    ConceptR@5 (the frozen evaluation nets score it; nothing is trained on them)."""

    data: object
    scorer: object
    case_set: object

    @classmethod
    def load(cls, data_root: str | Path, users: int = 32) -> TrainingLink | None:
        """None where the data has no EmojiPrefs style labels or the metric nets cannot load."""
        from pigeon.evaluation.data import load_eval_data
        from pigeon.evaluation.evaluate import Scorer
        from pigeon.evaluation.external import External
        from pigeon.evaluation.metric_nets import MetricNets

        try:
            data = load_eval_data(str(data_root), "val", limit=users)
            scorer = Scorer(data, MetricNets.load(), enl0=None, external=External())
        except (EvaluationError, OSError, ValueError) as exc:
            log.info("no chain link at validation (%s)", exc)
            return None
        return cls(data, scorer, scorer.case_set(data.cases))

    def measure(self, link: str, model, tokenizer) -> dict[str, float]:
        """{"link", "link_style_acc", "link_concept_r5"} of one link of the chain (a training
        stage's `Stage.chain_link`) at strength 1.0."""
        from pigeon.inference.pipeline import PigeonPipeline
        from pigeon.inference.runners import TorchRunner

        was_training = model.training
        model.eval()
        try:
            device = str(next(model.parameters()).device)
            pipe = PigeonPipeline(model.config, tokenizer, TorchRunner(model, device))
            rows = chain_images(pipe, self.data, self.data.cases, [1.0], links=(link,))
        finally:
            model.train(was_training)
        per, _, _ = self.scorer.score(next(iter(rows.values())), self.case_set, light=True)
        return {
            "link": link,
            "link_style_acc": round(float(per["style_acc"].mean()), 4),
            "link_concept_r5": round(float(per["concept_r5"].mean()), 4),
        }
