"""The size / latency / quality trade-off of the export variants, all measured in one run.

    python -m benchmarks.variants --preset small --checkpoint CKPT [--data demo/data/emojiprefs]
        [--users 100] [--split test] [--runs 10] [--variants fp32 int8 fast] [--eager]
        [--workdir runs/bench-variants] [--table benchmarks/results/variants.md]

Variants: fp32, fp16, int8 and mixed artifact folders of the same checkpoint (`pigeon export onnx
--precision ...`; int8/mixed calibrated on `--data`, validated like every export; folders are reused when
their manifest names the same checkpoint), and `fast` (`pigeon export onnx --variant fast`: int8
files served with their manifest's sampling defaults; `--steps` does not apply to it). `--eager`
adds PyTorch eager fp32 at the checkpoint's own settings (the recipe defaults), the baseline the
speed-up column divides by. For each variant, in this one run on this machine:

    size         bytes of its ONNX files (all components, and per component) and the precision kept
    peak memory  peak RSS (VmHWM) of a fresh process that loads the variant and generates one image
                 (ONNX Runtime only, no torch), and its RSS after imports, before loading
    latency      per component at the declared opt shape and end to end (the same request), p50/p95;
                 the variants run round robin, so the machine's load is shared by all of them
    quality      on the fixed users of EmojiPrefs (`--split`, the first --users), scored by
                 `pigeon evaluate`'s frozen metric nets: StyleAcc, ConceptR@5, FD-ENL0, SSIM to the ground
                 truth (means over the users, with 95% bootstrap intervals)

One JSON line per run goes to --out; the markdown table to stdout and --table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import append_jsonl, environment, percentiles, timestamp

VARIANTS = ("fp32", "fp16", "int8", "mixed", "fast")
EAGER = "eager"  # PyTorch eager fp32, the checkpoint's own settings: not an export


def export_variants(
    checkpoint: Path, workdir: Path, data: str, users: int, variants=VARIANTS
) -> dict[str, Path]:
    """One validated artifact folder per variant, reused when it matches the checkpoint."""
    from pigeon.checkpoint import load_checkpoint
    from pigeon.export.artifacts import export_onnx
    from pigeon.export.manifest import QUANTIZED_PRECISIONS, read_manifest
    from pigeon.export.quantize import Calibration
    from pigeon.export.variants import VARIANTS as NAMED
    from pigeon.export.variants import resolve

    ckpt = load_checkpoint(checkpoint)
    folders = {}
    for variant in variants:
        named = variant if variant in NAMED else "default"
        precision, defaults = resolve(named, None if variant in NAMED else variant)
        out = workdir / variant
        if (out / "manifest.json").exists():
            manifest = read_manifest(out)
            if (
                manifest["checkpoint_sha256"] == ckpt.digest
                and manifest["precision"] == precision
                and manifest.get("variant", "default") == named
                and manifest.get("sampling_defaults", {}) == defaults
                and manifest.get("fused_attention", False) == NAMED[named].fused_attention
            ):
                folders[variant] = out
                continue
        print(f"exporting {variant} ...", file=sys.stderr, flush=True)
        quantized = precision in QUANTIZED_PRECISIONS
        export_onnx(
            ckpt,
            out,
            precision=precision,
            variant=named,
            overwrite=True,
            calibration=Calibration(data=data, users=users) if quantized else None,
        )
        folders[variant] = out
    return folders


def sizes(folder: Path) -> dict:
    from pigeon.export.manifest import read_manifest

    manifest = read_manifest(folder)
    per = {}
    for name, entry in manifest["components"].items():
        per[name] = {
            "bytes": sum((folder / name / f).stat().st_size for f in entry["files"]),
            "precision": entry.get("precision", manifest["precision"]),
            "rejected": [r["precision"] for r in entry.get("rejected", [])],
        }
    return {"total_bytes": sum(c["bytes"] for c in per.values()), "components": per}


def benchmark_request(config, data_root: str | None, steps: int | None, split: str = "test"):
    """The end-to-end request: the first fixed user of EmojiPrefs' split, else a procedural user."""
    from benchmarks.common import procedural_request

    if data_root:
        from pigeon.evaluation.data import load_eval_data

        data = load_eval_data(data_root, split, limit=1)
        return quality_requests(data, data.cases, config, steps)[0]
    return procedural_request(config.image_size, steps)


def quality_requests(data, cases, config, steps: int | None) -> list:
    """As `pigeon evaluate` makes them: the most recent history items that fit, seed = index."""
    from pigeon.evaluation.methods import evaluation_requests

    return evaluation_requests(data, cases, config, steps=steps)


def quality_scorer(data_root: str, users: int, split: str = "test"):
    """The frozen metric nets of `pigeon evaluate` and its EfficientNet-Lite0 features (FD-ENL0,
    at ENL0Config's size, `pigeon evaluate`'s default) on the first `users` fixed users of `split`."""
    from pigeon.evaluation.data import load_eval_data
    from pigeon.evaluation.evaluate import Scorer
    from pigeon.evaluation.external import External
    from pigeon.evaluation.features import EfficientNetLite0, ENL0Config
    from pigeon.evaluation.metric_nets import MetricNets

    data = load_eval_data(data_root, split, limit=users)
    enl0 = EfficientNetLite0(ENL0Config())
    scorer = Scorer(data, MetricNets.load(), enl0=enl0, external=External())
    return data, scorer, scorer.case_set(data.cases)


def quality_scores(images: np.ndarray, data, scorer, case_set) -> dict[str, float]:
    """StyleAcc, ConceptR@5 and SSIM to the ground truth (means over the users) and FD-ENL0 to the
    ground-truth set, each with `pigeon evaluate`'s 95% bootstrap interval (`summarize`, its default
    resamples, the same for every variant); images resized to the data's size first."""
    from pigeon.evaluation.evaluate import EvalConfig, summarize
    from pigeon.evaluation.metrics import resize_images

    per, sets, _ = scorer.score(resize_images(images, data.size), case_set)
    names = {"StyleAcc": "style_acc", "ConceptR@5": "concept_r5", "SSIM": "ssim"}
    summary = summarize(
        {key: per[key] for key in names.values()},
        {"fd_enl0": sets["fd_enl0"]},
        len(images),
        EvalConfig(),
    )
    if len(images) >= 2:  # a Frechet distance needs two rows per set
        names["FD-ENL0"] = "fd_enl0"
    scores: dict = {}
    for name, key in names.items():
        s = summary[key]
        scores[name], scores[f"{name} interval"] = s["mean"], [round(s["lo"], 4), round(s["hi"], 4)]
    scores.setdefault("FD-ENL0", "needs 2 users")
    return scores


def probe_memory(args: argparse.Namespace) -> None:
    """Child process: load one variant, generate one image, report RSS (no torch imported)."""
    from pigeon.checkpoint import load_config
    from pigeon.config import ServingConfig
    from pigeon.inference.pipeline import PigeonPipeline
    from pigeon.inference.runners import OrtOptions, OrtRunner
    from pigeon.vocab import TextTokenizer

    def status_mib(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    config = variant_config(load_config(args.checkpoint), sampling_defaults(Path(args.probe)))
    tokenizer = TextTokenizer.load(
        Path(args.checkpoint) / "tokenizer" / "tokenizer.json", config.personalizer.text_vocab_size
    )
    request = load_request(Path(args.probe_request), args.steps)
    before = status_mib("VmRSS")
    options = OrtOptions.from_serving(ServingConfig())
    pipe = PigeonPipeline(config, tokenizer, OrtRunner.from_artifacts(args.probe, config, options))
    loaded = status_mib("VmRSS")
    pipe(request)
    # VmHWM: this process's peak RSS (ru_maxrss would include the parent's at fork, kept over exec)
    peak = status_mib("VmHWM")
    print(json.dumps({"imports_mib": before, "loaded_mib": loaded, "peak_mib": peak}))


def sampling_defaults(folder: Path) -> dict:
    """The sampling defaults a variant's manifest carries (the `fast` variant's; else none)."""
    from pigeon.export.manifest import read_manifest

    return read_manifest(folder, verify=False).get("sampling_defaults") or {}


def variant_config(config, defaults: dict):
    """The config a variant's folder is served with: its manifest's sampling defaults applied."""
    from pigeon.export.variants import with_sampling_defaults

    return with_sampling_defaults(config, {"sampling_defaults": defaults})


def variant_request(request, defaults: dict):
    """`--steps` applies to the variants without sampling defaults; the others use their own."""
    import dataclasses

    return dataclasses.replace(request, steps=None) if defaults else request


def save_request(request, path: Path) -> Path:
    """The benchmark request as plain arrays (the memory probe must not load the dataset)."""
    np.savez(
        path,
        reference=request.reference,
        text=np.array(request.text),
        seed=np.array(request.seed),
        **{f"history_{i}": h for i, h in enumerate(request.history)},
    )
    return path


def load_request(path: Path, steps: int | None):
    from pigeon.inference.pipeline import GenerationRequest

    with np.load(path, allow_pickle=False) as z:
        history = [z[f"history_{i}"] for i in range(sum(k.startswith("history_") for k in z))]
        return GenerationRequest(
            history=history,
            reference=z["reference"],
            text=str(z["text"]),
            seed=int(z["seed"]),
            steps=steps,
        )


def measure_memory(folder: Path, request_file: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.variants", "--probe", str(folder)]
    cmd += ["--checkpoint", str(args.checkpoint), "--probe-request", str(request_file)]
    if args.steps and not sampling_defaults(folder):
        cmd += ["--steps", str(args.steps)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe of {folder} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def round_robin(
    fns: dict[str, Callable[[], object]], warmup: int, runs: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved: warm-up rounds, then `runs` timed rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + runs):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
    return times


def table(record: dict) -> str:
    """The markdown trade-off table of one run (the eager row has no files, memory probe or
    component timings; the speed-up divides its end-to-end p50 by each row's)."""
    rows = record["variants"]
    exported = {k: r for k, r in rows.items() if "size" in r}
    fp32_bytes = exported["fp32"]["size"]["total_bytes"] if "fp32" in exported else None
    comps = list(next(iter(exported.values()))["size"]["components"])
    eager_p50 = rows[EAGER]["end_to_end_s"]["p50"] if EAGER in rows else None
    head = ["variant", "files MB", "of fp32", "peak RSS MiB", "e2e p50 ms", "e2e p95 ms"]
    head += ["speed-up vs eager", "sampling"]
    head += [f"{c} p50/p95 ms" for c in comps]
    head += ["SSIM", "StyleAcc", "ConceptR@5", "FD-ENL0", "precision kept per component"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def quality(q: dict, name: str) -> str:
        if isinstance(q[name], str):
            return q[name]
        interval = q.get(f"{name} interval")
        return f"{q[name]:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    for name, r in rows.items():
        size = r.get("size")
        e2e = r["end_to_end_s"]
        defaults = record.get("sampling_defaults", {}).get(name) or {}
        cells = [
            name,
            f"{size['total_bytes'] / 1e6:.1f}" if size else "-",
            f"{size['total_bytes'] / fp32_bytes:.0%}" if size and fp32_bytes else "-",
            f"{r['memory']['peak_mib']:.0f}" if "memory" in r else "-",
            f"{e2e['p50'] * 1e3:.0f}",
            f"{e2e['p95'] * 1e3:.0f}",
            f"{eager_p50 / e2e['p50']:.2f}x" if eager_p50 else "-",
            " ".join(f"{k}={v}" for k, v in defaults.items()) or f"{record['steps']} steps",
        ]
        for c in comps:
            t = r.get("components_s", {}).get(c)
            cells.append(f"{t['p50'] * 1e3:.1f} / {t['p95'] * 1e3:.1f}" if t else "-")
        q = r["quality"]
        cells += [quality(q, n) for n in ("SSIM", "StyleAcc", "ConceptR@5", "FD-ENL0")]
        cells.append(
            ", ".join(
                f"{c}: {v['precision']}"
                + (f" ({'/'.join(v['rejected'])} rejected)" if v["rejected"] else "")
                for c, v in size["components"].items()
            )
            if size
            else "PyTorch fp32"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TUNINGS = {  # ServingConfig overrides compared side by side (end to end, one variant)
    "default": {},
    "io_binding": {"ort_io_binding": True},
    "graph_optimization=basic": {"ort_graph_optimization": "basic"},
    "execution_mode=parallel": {"ort_execution_mode": "parallel", "ort_inter_op_threads": 2},
    "allow_spinning": {"ort_allow_spinning": True},
    "threads=1": {"ort_threads": 1},
}


def tuning(folder: Path, ckpt, request, args: argparse.Namespace) -> dict:
    """End-to-end p50/p95 of one variant under each TUNINGS setting, round robin."""
    import dataclasses

    from pigeon.config import ServingConfig
    from pigeon.inference.pipeline import PigeonPipeline
    from pigeon.inference.runners import OrtOptions, OrtRunner

    pipes = {}
    for name, overrides in TUNINGS.items():
        options = OrtOptions.from_serving(dataclasses.replace(ServingConfig(), **overrides))
        options = dataclasses.replace(options, session_reuse=False)  # separate sessions
        runner = OrtRunner.from_artifacts(folder, ckpt.config, options)
        pipes[name] = PigeonPipeline(ckpt.config, ckpt.tokenizer, runner)
    times = round_robin({k: (lambda p=p: p(request)) for k, p in pipes.items()}, 1, args.runs)
    return {k: percentiles(t) for k, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", help="recorded; the checkpoint sets the sizes")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=None, help="EmojiPrefs folder (quality, calibration)")
    parser.add_argument("--users", type=int, default=100, help="users for the quality columns")
    parser.add_argument("--split", default="test", choices=["val", "test"], help="their split")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--eager",
        action="store_true",
        help="also PyTorch eager fp32 at the checkpoint's settings (the speed-up's baseline)",
    )
    parser.add_argument("--calibration-users", type=int, default=16)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--component-runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="benchmarks/results/variants.jsonl")
    parser.add_argument("--table", default=None, help="also write the markdown table here")
    parser.add_argument(
        "--tuning",
        default=None,
        choices=VARIANTS[:4],
        help="also compare session settings (TUNINGS) end to end on this variant",
    )
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # memory child process
    parser.add_argument("--probe-request", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tuning and args.tuning not in args.variants:
        parser.error(f"--tuning {args.tuning} is not among --variants {args.variants}")
    if args.probe:
        probe_memory(args)
        return

    from pigeon.checkpoint import load_checkpoint
    from pigeon.config import ServingConfig
    from pigeon.inference.pipeline import PigeonPipeline
    from pigeon.inference.runners import OrtOptions, OrtRunner, TorchRunner
    from pigeon.specs import component_specs, sample_inputs

    checkpoint = Path(args.checkpoint)
    workdir = Path(args.workdir or f"runs/bench-variants-{args.preset}")
    ckpt = load_checkpoint(checkpoint)
    config = ckpt.config
    folders = export_variants(
        checkpoint, workdir, args.data or "procedural", args.calibration_users, args.variants
    )
    serving = ServingConfig()
    options = OrtOptions.from_serving(serving)
    runners = {v: OrtRunner.from_artifacts(f, config, options) for v, f in folders.items()}
    defaults = {v: sampling_defaults(f) for v, f in folders.items()}  # read once per folder
    pipes = {
        v: PigeonPipeline(variant_config(config, defaults[v]), ckpt.tokenizer, r)
        for v, r in runners.items()
    }
    if args.eager:
        pipes[EAGER] = PigeonPipeline(config, ckpt.tokenizer, TorchRunner(ckpt.model))
    env = environment()
    record: dict = {
        "benchmark": "variants",
        "time": timestamp(),
        "env": env,
        "preset": args.preset,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": ckpt.digest,
        "serving": {k: v for k, v in vars(serving).items() if k.startswith("ort_")},
        "steps": args.steps or config.scheduler.num_inference_steps,
        "variants": {v: {"size": sizes(f)} for v, f in folders.items()},
        "sampling_defaults": defaults,
    }
    if args.eager:
        record["variants"][EAGER] = {}
    print(f"variants {list(folders)}, preset {args.preset}, {env['cores']} cores", file=sys.stderr)

    # memory: a fresh process per variant
    request = benchmark_request(config, args.data, args.steps, args.split)
    requests = {v: variant_request(request, defaults[v]) for v in folders}
    requests[EAGER] = request
    request_file = save_request(request, workdir / "request.npz")
    for v, f in folders.items():
        record["variants"][v]["memory"] = measure_memory(f, request_file, args)

    # per component at the opt shape, round robin over the variants
    for name, spec in component_specs(config).items():
        if not all(name in r.sessions for r in runners.values()):
            continue
        feeds = sample_inputs(spec, config, "opt")
        times = round_robin(
            {v: (lambda r=r, n=name, f=feeds: r.run(n, f)) for v, r in runners.items()},
            args.warmup,
            args.component_runs,
        )
        for v, t in times.items():
            record["variants"][v].setdefault("components_s", {})[name] = percentiles(t)

    # end to end: the same request, round robin; per-stage timings from the pipeline
    stages: dict[str, dict[str, list[float]]] = {v: {} for v in pipes}

    def generate(v: str) -> None:
        for stage, seconds in pipes[v](requests[v])[0].timings.items():
            stages[v].setdefault(stage, []).append(seconds)

    round_robin({v: (lambda v=v: generate(v)) for v in pipes}, args.warmup, args.runs)
    for v in pipes:
        per_stage = {s: percentiles(t[args.warmup :]) for s, t in stages[v].items()}
        record["variants"][v]["end_to_end_s"] = per_stage.pop("total")
        record["variants"][v]["stages_s"] = per_stage

    # quality on the fixed users of the split, scored like `pigeon evaluate`
    if args.data:
        data, scorer, case_set = quality_scorer(args.data, args.users, args.split)
        cases = quality_requests(data, data.cases, config, args.steps)
        record["quality_users"], record["quality_split"] = len(cases), args.split
        for v, pipe in pipes.items():
            start = time.perf_counter()
            own = cases if v == EAGER else [variant_request(r, defaults[v]) for r in cases]
            images = np.stack([pipe(r)[0].image for r in own])
            quality = quality_scores(images, data, scorer, case_set)
            quality["seconds"] = round(time.perf_counter() - start, 1)
            record["variants"][v]["quality"] = quality
            print(f"{v}: quality {quality}", file=sys.stderr, flush=True)
    else:
        for v in pipes:
            record["variants"][v]["quality"] = {
                "SSIM": "needs --data",
                "StyleAcc": "needs --data",
                "ConceptR@5": "needs --data",
                "FD-ENL0": "needs --data",
            }

    if args.tuning:
        record["tuning"] = tuning(folders[args.tuning], ckpt, request, args)

    append_jsonl(args.out, record)
    text = table(record)
    print(text)
    if "tuning" in record:
        print(f"\nsession settings, {args.tuning} variant, end to end (round robin):")
        for name, stats in record["tuning"].items():
            print(
                f"  {name:<32} p50 {stats['p50'] * 1e3:7.0f} ms  p95 {stats['p95'] * 1e3:7.0f} ms"
            )
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(text + "\n")


if __name__ == "__main__":
    main()
