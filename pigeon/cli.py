"""The `pigeon` command line.

    pigeon init --preset tiny --out runs/tiny
    pigeon generate --checkpoint runs/tiny --history a.png b.png --reference r.png --text "a cat" --out o.png
    pigeon data procedural --out data/shapes --users 8
    pigeon export onnx --checkpoint runs/tiny --out artifacts/tiny
    pigeon generate --backend onnxruntime --artifacts artifacts/tiny --checkpoint runs/tiny ...
    pigeon export all --checkpoint runs/tiny --repository triton_models --version 2
    pigeon checkpoint inspect runs/tiny
    pigeon config show --preset small --set personalizer.num_layers=6

Logs go to stderr; a JSON summary goes to stdout; any failure exits non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

from pigeon.export.manifest import PRECISIONS
from pigeon.export.variants import VARIANTS
from pigeon.interface import add_parameter_flags, parameter_values

log = logging.getLogger("pigeon")


def run_init(args: argparse.Namespace) -> dict:
    """A randomly initialised checkpoint, for tests and plumbing."""
    import torch

    from pigeon.checkpoint import save_checkpoint
    from pigeon.config import apply_overrides, preset
    from pigeon.models.pigeon import PigeonModel
    from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

    config = apply_overrides(preset(args.preset), args.set or [])
    torch.manual_seed(args.seed)
    model = PigeonModel(config)
    vocab_size = config.personalizer.text_vocab_size
    tokenizer = TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, vocab_size), vocab_size)
    path = save_checkpoint(
        model,
        tokenizer,
        args.out,
        overwrite=args.overwrite,
        extra={"created_by": "pigeon init", "seed": args.seed},
    )
    params = sum(p.numel() for p in model.parameters())
    log.info("initialised %s preset (%.2fM parameters) at %s", config.preset, params / 1e6, path)
    return {"checkpoint": str(path), "preset": config.preset, "parameters": params}


def make_pipeline(
    checkpoint: str,
    backend: str,
    artifacts: str | None,
    serving=None,
    device: str = "cpu",
    compile: bool = False,
):
    """A pipeline on the chosen backend; the checkpoint always supplies configs and the tokenizer,
    `serving` (a ServingConfig) the ONNX Runtime session settings. `device` and `compile` (the
    `runners.GPU_COMPILE` torch.compile modes) are PyTorch-backend settings."""
    from pigeon.config import ConfigError
    from pigeon.inference.pipeline import PigeonPipeline

    if backend == "pytorch":
        import torch

        from pigeon.inference.runners import GPU_COMPILE

        try:
            kind = torch.device(device).type
        except RuntimeError as exc:
            raise ConfigError(f"--device {device!r} is not a torch device: {exc}") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__})"
            )
        return PigeonPipeline.from_checkpoint(checkpoint, device, GPU_COMPILE if compile else None)
    if device != "cpu" or compile:
        raise ConfigError(
            f"--device {device} / --compile are PyTorch-backend settings; --backend {backend} takes "
            "its providers from --serving"
        )
    from pigeon.checkpoint import CheckpointError, load_checkpoint, load_config
    from pigeon.export.manifest import read_manifest
    from pigeon.export.variants import with_sampling_defaults
    from pigeon.inference.runners import OrtOptions, OrtRunner
    from pigeon.vocab import TextTokenizer

    if not artifacts:
        raise CheckpointError(f"--backend {backend} needs --artifacts (from `pigeon export onnx`)")
    manifest = read_manifest(artifacts)
    config = load_config(checkpoint)
    digest = load_checkpoint(checkpoint, verify=True).digest
    if manifest["checkpoint_sha256"] != digest:
        raise CheckpointError(
            f"{artifacts} was exported from another checkpoint ({manifest['checkpoint']}); "
            f"re-export it from {checkpoint}"
        )
    tokenizer = TextTokenizer.load(
        Path(checkpoint) / "tokenizer" / "tokenizer.json", config.personalizer.text_vocab_size
    )
    options = OrtOptions.from_serving(serving) if serving is not None else OrtOptions()
    config = with_sampling_defaults(config, manifest)  # the variant's (pigeon.export.variants)
    return PigeonPipeline(config, tokenizer, OrtRunner.from_artifacts(artifacts, config, options))


def run_generate(args: argparse.Namespace) -> dict:
    from pigeon.core.images import load_image, save_png
    from pigeon.inference.pipeline import GenerationRequest

    history = [load_image(p) for p in args.history]
    reference = load_image(args.reference)
    start = time.perf_counter()
    serving = load_serving(args.serving) if args.serving else None
    pipe = make_pipeline(
        args.checkpoint, args.backend, args.artifacts, serving, args.device, args.compile
    )
    load_s = time.perf_counter() - start
    request = GenerationRequest(
        history=history,
        reference=reference,
        text=args.text,
        **parameter_values(args),
    )
    result = pipe(request)[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(result.image, out)
    log.info("wrote %s (%d visual tokens, %.2fs)", out, len(result.tokens), result.timings["total"])
    return {
        "out": str(out),
        "backend": args.backend,
        "tokens": len(result.tokens),
        "load_s": round(load_s, 4),
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_checkpoint_import(args: argparse.Namespace) -> dict:
    """A Pigeon checkpoint from diffusers / transformers / PEFT folders (pigeon.interop)."""
    from pigeon.interop import import_weights

    return import_weights(
        args.out,
        base=args.base,
        preset_name=args.preset,
        unet=args.unet,
        vae=args.vae,
        llm=args.llm,
        peft=args.peft,
        overwrite=args.overwrite,
    )


def run_checkpoint_export_diffusers(args: argparse.Namespace) -> dict:
    from pigeon.interop import export_diffusers

    return export_diffusers(args.checkpoint, args.out)


def run_checkpoint_export_peft(args: argparse.Namespace) -> dict:
    from pigeon.interop import export_peft

    return export_peft(args.checkpoint, args.out)


def run_inspect(args: argparse.Namespace) -> dict:
    from safetensors import safe_open

    from pigeon.checkpoint import load_config, read_index, verify_files

    path = Path(args.checkpoint)
    index = read_index(path)
    verify_files(path, index)
    config = load_config(path)
    components = {}
    for rel in index["files"]:
        if rel.endswith(".safetensors"):
            with safe_open(str(path / rel), "np") as f:
                count = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
            components[rel.split("/")[0]] = {"parameters": count, "sha256": index["files"][rel]}
    return {
        "checkpoint": str(path),
        "preset": config.preset,
        "image_size": config.image_size,
        "verified": True,
        "components": components,
    }


def run_data_procedural(args: argparse.Namespace) -> dict:
    """Synthetic users from the procedural shapes set: one folder of PNGs per user + users.jsonl
    (`--format folders`), or an interaction log in the user-data format (`--format user`)."""
    if args.format == "user":
        from pigeon.data.user_data import write_procedural_user_data

        info = write_procedural_user_data(
            args.out, args.users, args.sequence_length, args.size, args.noise_ratio, args.seed
        )
        log.info(
            "wrote %d users' interactions over %d items to %s", args.users, info["items"], args.out
        )
        return {k: info[k] for k in ("out", "items", "users", "interactions")}
    import numpy as np

    from pigeon.core.images import save_png
    from pigeon.data.procedural import render, sample_user

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    rows = []
    for u in range(args.users):
        user = sample_user(rng, args.history_length, args.noise_ratio)
        folder = out / f"user{u}"
        folder.mkdir(exist_ok=True)
        history = []
        for i, (concept, style) in enumerate(user.history):
            save_png(render(concept, style, args.size), folder / f"history_{i}.png")
            history.append(f"user{u}/history_{i}.png")
        save_png(render(*user.reference, args.size), folder / "reference.png")
        save_png(render(*user.target, args.size), folder / "target.png")
        (folder / "text.txt").write_text(user.text + "\n")
        rows.append(
            {
                "user": f"user{u}",
                "style": user.style,
                "history": history,
                "reference": f"user{u}/reference.png",
                "target": f"user{u}/target.png",
                "text": user.text,
            }
        )
    (out / "users.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log.info("wrote %d procedural users to %s", len(rows), out)
    return {"out": str(out), "users": len(rows)}


def calibration_of(args: argparse.Namespace):
    """int8/mixed: where static quantization's ranges come from (`--calibration`,
    `--calibration-users`); None for the float precisions, which calibrate nothing."""
    from pigeon.export.manifest import QUANTIZED_PRECISIONS
    from pigeon.export.quantize import Calibration
    from pigeon.export.variants import resolve

    if resolve(args.variant, args.precision)[0] not in QUANTIZED_PRECISIONS:
        return None
    return Calibration(data=args.calibration, users=args.calibration_users)


def run_export_onnx(args: argparse.Namespace) -> dict:
    from pigeon.export.artifacts import export_onnx

    manifest = export_onnx(
        args.checkpoint,
        args.out,
        precision=args.precision,
        variant=args.variant,
        fused_attention=args.fused_attention,
        components=args.components,
        overwrite=args.overwrite,
        calibration=calibration_of(args),
        strict=args.strict,
    )
    return {
        "artifacts": args.out,
        "precision": manifest["precision"],
        "variant": manifest["variant"],
        "sampling_defaults": manifest["sampling_defaults"],
        "components": {
            n: {
                "file": e["file"],
                "opset": e["opset"],
                "precision": e.get("precision", manifest["precision"]),
                "max_error": max(v for p in e["max_error"].values() for v in p.values()),
                "rejected": [r["precision"] for r in e.get("rejected", [])],
            }
            for n, e in manifest["components"].items()
        },
    }


def run_export_tensorrt(args: argparse.Namespace) -> dict:
    from pigeon.checkpoint import CheckpointError
    from pigeon.export.tensorrt import build_repository_engines, export_tensorrt

    if args.repository:
        if args.version is None:
            raise CheckpointError("--repository needs --version")
        records = build_repository_engines(
            args.repository, args.version, precision=args.precision, cache_dir=args.cache_dir
        )
        return {"repository": args.repository, "engines": records}
    if not args.artifacts:
        raise CheckpointError("give --artifacts ART, or --repository REPO/gpu --version N")

    records = export_tensorrt(args.artifacts, precision=args.precision, cache_dir=args.cache_dir)
    return {"artifacts": args.artifacts, "engines": records}


def load_serving(path: str | None):
    from pigeon.config import ServingConfig, load_json

    return load_json(ServingConfig, path) if path else ServingConfig()


def run_export_all(args: argparse.Namespace) -> dict:
    from pigeon.export.publish import export_all

    manifest = export_all(
        args.checkpoint,
        args.repository,
        args.version,
        target=args.target,
        serving=load_serving(args.serving),
        precision=args.precision,
        variant=args.variant,
        fused_attention=args.fused_attention,
        calibration=calibration_of(args),
        strict=args.strict,
    )
    return {
        "repository": args.repository,
        "version": args.version,
        "components": list(manifest["components"]),
    }


def run_serve(args: argparse.Namespace) -> dict:
    """Start tritonserver, print the endpoints, serve until SIGTERM/SIGINT, then stop cleanly."""
    import signal

    from pigeon.serving.server import TritonServer

    server = TritonServer(
        Path(args.repository) / args.target,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        admin_header=args.admin_key,
    )
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    server.start()
    # one request through the whole ensemble before the endpoints are announced, so that the first
    # client's request is not the one that pays for the models' first calls
    warm_up_s = server.warm_up() if args.warm_up else None
    print(
        json.dumps(
            {
                "http": server.http_url,
                "grpc": server.grpc_url,
                "metrics": server.metrics_url,
                "pid": server.process.pid,
                "warm_up_s": None if warm_up_s is None else round(warm_up_s, 3),
            }
        ),
        flush=True,
    )
    log.info("serving %s; send SIGTERM or Ctrl-C to stop", server.repository)
    while not stop and server.process.poll() is None:
        time.sleep(0.2)
    code = server.stop()
    return {"stopped": True, "exit_code": code}


def run_client_generate(args: argparse.Namespace) -> dict:
    from pigeon.files import write_atomic
    from pigeon.serving.client import PigeonClient

    with PigeonClient(args.url, args.protocol, args.timeout) as client:
        result = client.generate(
            args.history,
            args.reference,
            args.text,
            **parameter_values(args),
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, result.image_png)
    return {"out": str(out), "latency_s": round(result.latency_s, 4), "timings_s": result.timings}


def run_deploy(args: argparse.Namespace) -> dict:
    from pigeon.checkpoint import CheckpointError
    from pigeon.serving.client import deploy, rollback

    repository = Path(args.repository) / args.target
    headers = dict([args.admin_key]) if args.admin_key else None
    if args.rollback:
        return {"deployed": rollback(args.url, repository, headers), "rollback": True}
    if args.version is None:
        raise CheckpointError("give --version N or --rollback")
    lora = None
    if args.lora:
        from pigeon.export.publish import publish_lora

        if not args.checkpoint:
            raise CheckpointError(
                "--lora needs --checkpoint: the checkpoint the base version serves"
            )
        manifest = publish_lora(
            args.checkpoint,
            args.lora,
            args.repository,
            args.version,
            base_version=args.base_version,
            target=args.target,
        )
        lora = manifest["lora"]
    return {
        "deployed": args.version,
        "models": deploy(args.url, repository, args.version, headers),
        **({"lora": lora} if lora else {}),
    }


def run_train(args: argparse.Namespace) -> dict:
    import torch

    from pigeon.training.loop import train_all, train_stage

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {
        "preset_name": args.preset,
        "data_source": args.data,
        "overrides": (args.set or []) + (["train.lora_only=true"] if args.lora_only else []),
        "resume": args.resume,
        "init": args.init,
        "device": device,
        "stop_after": args.stop_after,
    }
    if args.stage == "all":
        return {"stages": train_all(args.out, **kwargs)}
    return train_stage(args.stage, args.out, **kwargs)


def run_triton_configs(args: argparse.Namespace) -> dict:
    """Regenerate config.pbtxt of every model for both targets (the committed repository)."""
    from pigeon.checkpoint import load_config
    from pigeon.config import preset
    from pigeon.serving.repository import write_configs

    config = load_config(args.checkpoint) if args.checkpoint else preset(args.preset)
    serving = load_serving(args.serving)
    written = []
    for target in ("cpu", "gpu"):
        written += [
            str(p) for p in write_configs(Path(args.repository) / target, config, serving, target)
        ]
    return {"written": written}


def run_data_emojiprefs(args: argparse.Namespace) -> dict:
    from pigeon.data.emojiprefs import build_emojiprefs

    info = build_emojiprefs(
        Path(args.out),
        args.size,
        args.styles,
        args.permissive_only,
        Path(args.cache_dir) if args.cache_dir else None,
        seed=args.seed,
        log=lambda message: log.info("%s", message),
    )
    return {"out": args.out, **{k: info[k] for k in ("content_sha256", "counts") if k in info}}


def run_data_user(args: argparse.Namespace) -> dict:
    """Check a user-data folder: windows per split and every rejected row with its line."""
    from pigeon.data.user_data import load_user_data

    data = load_user_data(
        args.root, args.history_length, on_error=args.on_error, split=args.split, seed=args.seed
    )
    for problem in data.report:
        log.warning("skipped %s", problem)
    return {**data.summary(), "problems": [str(p) for p in data.report]}


INFERENCE_SECTIONS = ("scheduler.", "generation.")


def run_checkpoint_convert(args: argparse.Namespace) -> dict:
    """Re-save a checkpoint with another storage dtype (e.g. float16 to publish or commit it) and,
    optionally, other sampling/decoding defaults (`--set scheduler.strength=0.6`)."""
    from pigeon.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    if args.set:
        # sampling and decoding defaults only: an architecture change would not match the weights
        from pigeon.config import ConfigError, apply_overrides

        bad = [k for k in args.set if not k.startswith(INFERENCE_SECTIONS)]
        if bad:
            raise ConfigError(
                f"--set {bad[0]!r}: convert only changes {', '.join(INFERENCE_SECTIONS)} defaults"
            )
        ckpt.model.config = apply_overrides(ckpt.model.config, args.set)
    out = save_checkpoint(
        ckpt.model,
        ckpt.tokenizer,
        args.out,
        overwrite=args.overwrite,
        storage_dtype=args.dtype,
        extra={"converted_from": str(args.checkpoint), "sha256": ckpt.digest},
    )
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {"checkpoint": str(out), "storage_dtype": args.dtype, "bytes": size}


def run_evaluate(args: argparse.Namespace) -> dict:
    """Baselines, stage ablations and Pigeon scored by the frozen metrics (pigeon.evaluation); with
    --chain, the image chain of one checkpoint instead (pigeon.evaluation.chain); on a user-data
    folder, the metrics that need no per-style ground truth (pigeon.evaluation.user_eval)."""
    if args.chain:
        from pigeon.evaluation.chain import command as chain_command

        return chain_command(args)
    from pigeon.evaluation.user_eval import command as user_data_command
    from pigeon.evaluation.user_eval import is_user_data

    if args.data is None:
        from pigeon.evaluation.evaluate import default_data

        args.data = default_data(args.checkpoint)
    if is_user_data(args.data):
        return user_data_command(args)
    from pigeon.evaluation.evaluate import command

    return command(args)


def run_config_show(args: argparse.Namespace) -> dict:
    from pigeon.checkpoint import load_config
    from pigeon.config import apply_overrides, preset, to_dict

    config = load_config(args.checkpoint) if args.checkpoint else preset(args.preset)
    return to_dict(apply_overrides(config, args.set or []))


# --- argument types: a bad value is refused by name before anything runs --------------------------


def _number(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 1")
    return value


def _unit_float(text: str) -> float:
    value = _number(float, text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} must be a number in [0, 1]")
    return value


def _positive_seconds(text: str) -> float:
    value = _number(float, text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds > 0")
    return value


def _utf8_text(text: str) -> str:
    """Arguments that are not valid UTF-8 arrive with surrogate escapes; refuse them by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text[exc.start].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8 (byte 0x{raw.hex()} at character {exc.start})"
        ) from None
    return text


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r} must be HEADER=VALUE, e.g. admin-key=s3cret")
    return key, value


PRECISION_HELP = (
    "default fp32 (or the variant's); int8: ONNX Runtime quantization per component, a component "
    "that fails validation kept in fp16/fp32; mixed: per component the fastest valid of "
    "fp32/fp16/int8 on this CPU"
)
VARIANT_HELP = (
    "fast: mixed-precision files with fused attention, served with DDIM at 10 steps by default "
    "(pigeon.export.variants; measured in benchmarks/README.md)"
)


def add_quantization_args(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--calibration",
        default="procedural",
        metavar="DATA",
        help="int8/mixed: 'procedural' or an EmojiPrefs folder; its training split calibrates the "
        "convolutional components, its validation split checks them",
    )
    q.add_argument("--calibration-users", type=int, default=16, help="int8/mixed")
    q.add_argument(
        "--strict",
        action="store_true",
        help="int8: a component that fails validation is an error instead of kept in fp16/fp32",
    )


class _TableHelpFormatter(
    argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter
):
    """Defaults in the help, and a description printed as written (a table)."""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="pigeon", description=__doc__, formatter_class=fmt)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="randomly initialised checkpoint", formatter_class=fmt)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_init)

    p = sub.add_parser("generate", help="one personalized image", formatter_class=fmt)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--history", nargs="+", required=True, metavar="IMAGE")
    p.add_argument("--reference", required=True, metavar="IMAGE")
    p.add_argument("--text", required=True, type=_utf8_text)
    p.add_argument("--out", required=True)
    add_parameter_flags(p)
    p.add_argument("--backend", choices=["pytorch", "onnxruntime"], default="pytorch")
    p.add_argument("--artifacts", default=None, help="ONNX artifact folder (onnxruntime backend)")
    p.add_argument("--serving", default=None, help="serving.json: ONNX Runtime session settings")
    p.add_argument("--device", default="cpu", help="pytorch backend: cpu, cuda or cuda:N")
    p.add_argument(
        "--compile",
        action="store_true",
        help="pytorch backend: torch.compile the components (CUDA graphs on a GPU; the first call "
        "compiles, so it pays off in a server or a benchmark, not in one CLI call)",
    )
    p.set_defaults(func=run_generate)

    p = sub.add_parser("export", help="ONNX, TensorRT and model versions", formatter_class=fmt)
    esub = p.add_subparsers(dest="export_command", required=True)
    q = esub.add_parser("onnx", help="validated ONNX per component", formatter_class=fmt)
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    q.add_argument("--variant", choices=list(VARIANTS), default="default", help=VARIANT_HELP)
    q.add_argument("--fused-attention", action="store_true", help="opset 23 ONNX Attention")
    q.add_argument("--components", nargs="+", default=None, help="default: all")
    q.add_argument("--overwrite", action="store_true")
    add_quantization_args(q)
    q.set_defaults(func=run_export_onnx)
    q = esub.add_parser("tensorrt", help="TensorRT engines (GPU + TensorRT)", formatter_class=fmt)
    q.add_argument("--artifacts", default=None, help="an artifact folder (pigeon export onnx)")
    q.add_argument("--repository", default=None, help="or a gpu repository folder (+ --version)")
    q.add_argument("--version", type=int, default=None)
    q.add_argument("--precision", choices=["fp32", "fp16"], default="fp16")
    q.add_argument("--cache-dir", default=None, help="default: ARTIFACTS/.engine-cache")
    q.set_defaults(func=run_export_tensorrt)
    q = esub.add_parser(
        "all", help="export, validate, publish a model version", formatter_class=fmt
    )
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--repository", required=True)
    q.add_argument("--version", type=int, required=True)
    q.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    q.add_argument("--variant", choices=list(VARIANTS), default="default", help=VARIANT_HELP)
    q.add_argument("--fused-attention", action="store_true")
    q.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    add_quantization_args(q)
    q.add_argument("--serving", default=None, help="serving.json (ServingConfig)")
    q.set_defaults(func=run_export_all)

    p = sub.add_parser("serve", help="run tritonserver on the repository", formatter_class=fmt)
    p.add_argument("--repository", default="triton_models")
    p.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="bind address (put auth in front of it)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", default=None)
    p.add_argument(
        "--admin-key",
        type=_header,
        default=None,
        metavar="HEADER=VALUE",
        help="require this header on the model-load/unload, shared-memory, trace and logging APIs "
        "(HTTP and gRPC); inference and health stay open (docs/RELIABILITY.md)",
    )
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="announce the endpoints without first sending one synthetic request through the "
        "ensemble (the first client's request then pays for the models' first calls)",
    )
    p.set_defaults(func=run_serve)

    from pigeon.training.stages import STAGES

    p = sub.add_parser(
        "train",
        help="train a stage, or the whole recipe",
        description="stages, in the recipe's order:\n"
        + "\n".join(f"  {s.name:8s} {s.summary}" for s in STAGES.values())
        + "\n  all      every stage in order",
        formatter_class=_TableHelpFormatter,
    )
    p.add_argument("stage", choices=[*STAGES, "all"])
    p.add_argument("--preset", default="tiny")
    p.add_argument(
        "--data",
        default="procedural",
        help="'procedural', an EmojiPrefs folder or a user-data folder (interactions.jsonl, "
        "items.jsonl, images; docs/DESIGN.md)",
    )
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--init",
        default=None,
        help="checkpoint to start from, even where --out holds an earlier stage (default: the "
        "previous stage's best in --out, else a fresh model; `all`: the first stage only)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="train.lr=1e-4 for the stage's TrainConfig, or a model config key",
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="leave after N steps (checkpointed); continue later with --resume",
    )
    p.add_argument(
        "--lora-only",
        action="store_true",
        help="sft, dpo: train the personalizer's LoRA alone (then `pigeon checkpoint export-peft` "
        "and `pigeon deploy --lora`)",
    )
    p.set_defaults(func=run_train)

    p = sub.add_parser(
        "triton-configs", help="regenerate the repository's config.pbtxt files", formatter_class=fmt
    )
    p.add_argument("--repository", default="triton_models")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoint", default=None, help="take the sizes from a checkpoint instead")
    p.add_argument("--serving", default=None, help="serving.json (ServingConfig)")
    p.set_defaults(func=run_triton_configs)

    p = sub.add_parser("client", help="talk to a served Pigeon", formatter_class=fmt)
    csub = p.add_subparsers(dest="client_command", required=True)
    q = csub.add_parser(
        "generate", help="one request to the `pigeon` ensemble", formatter_class=fmt
    )
    q.add_argument("--url", default="127.0.0.1:8001")
    q.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    q.add_argument("--history", nargs="+", required=True, metavar="IMAGE")
    q.add_argument("--reference", required=True, metavar="IMAGE")
    q.add_argument("--text", required=True, type=_utf8_text)
    q.add_argument("--out", required=True)
    add_parameter_flags(q)
    q.add_argument("--timeout", type=_positive_seconds, default=120.0, help="seconds")
    q.set_defaults(func=run_client_generate)

    p = sub.add_parser("deploy", help="switch the served version", formatter_class=fmt)
    p.add_argument("--url", default="127.0.0.1:8000", help="HTTP endpoint")
    p.add_argument("--repository", default="triton_models")
    p.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--rollback", action="store_true")
    p.add_argument(
        "--lora",
        default=None,
        metavar="ADAPTER",
        help="publish --version as the served version with this PEFT LoRA in the personalizer "
        "(only the personalizer is exported; needs --checkpoint), then switch to it",
    )
    p.add_argument(
        "--checkpoint", default=None, help="--lora: the checkpoint the base version serves"
    )
    p.add_argument("--base-version", type=int, default=None, help="--lora: default the newest")
    p.add_argument(
        "--admin-key",
        type=_header,
        default=None,
        metavar="HEADER=VALUE",
        help="the header the server's --admin-key requires",
    )
    p.set_defaults(func=run_deploy)

    p = sub.add_parser("data", help="datasets", formatter_class=fmt)
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("procedural", help="synthetic users from drawn shapes", formatter_class=fmt)
    q.add_argument("--out", required=True)
    q.add_argument("--users", type=_positive_int, default=8)
    q.add_argument("--size", type=_positive_int, default=32)
    q.add_argument("--history-length", type=_positive_int, default=5)
    q.add_argument("--noise-ratio", type=_unit_float, default=0.2)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--format",
        choices=["folders", "user"],
        default="folders",
        help="folders: history/reference/target PNGs per user (what `pigeon generate` reads); "
        "user: items.jsonl + interactions.jsonl + images (what `pigeon train --data` reads)",
    )
    q.add_argument(
        "--sequence-length",
        type=_positive_int,
        default=8,
        help="--format user: interactions per user (a user gives length - history windows)",
    )
    q.set_defaults(func=run_data_procedural)
    q = dsub.add_parser(
        "emojiprefs", help="build EmojiPrefs from open emoji sets (npm)", formatter_class=fmt
    )
    q.add_argument("--out", required=True)
    q.add_argument("--size", type=_positive_int, default=64)
    q.add_argument("--styles", nargs="+", default=None, help="default: the 7 distinct styles")
    q.add_argument("--permissive-only", action="store_true", help="drop CC BY-SA sets")
    q.add_argument("--cache-dir", default=None, help="npm tarball cache (default: ~/.cache)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=run_data_emojiprefs)
    q = dsub.add_parser(
        "user", help="check a user-data folder (interactions + items)", formatter_class=fmt
    )
    q.add_argument("root")
    q.add_argument("--history-length", type=_positive_int, default=5)
    q.add_argument("--on-error", choices=["skip", "raise"], default="skip")
    q.add_argument("--split", choices=["random", "temporal"], default="random")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=run_data_user)

    p = sub.add_parser("checkpoint", help="checkpoint tools", formatter_class=fmt)
    csub = p.add_subparsers(dest="checkpoint_command", required=True)
    q = csub.add_parser("inspect", help="verify and summarise a checkpoint", formatter_class=fmt)
    q.add_argument("checkpoint")
    q.set_defaults(func=run_inspect)
    q = csub.add_parser("convert", help="re-save with another storage dtype", formatter_class=fmt)
    q.add_argument("checkpoint")
    q.add_argument("--out", required=True)
    q.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    q.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="scheduler.* or generation.* default"
    )
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=run_checkpoint_convert)
    q = csub.add_parser(
        "import",
        help="build a checkpoint from diffusers / transformers / PEFT folders (safetensors only)",
        formatter_class=fmt,
    )
    q.add_argument("--out", required=True)
    q.add_argument("--base", default=None, help="Pigeon checkpoint for the components not given")
    q.add_argument("--preset", default="base", help="without --base: a fresh model of this preset")
    q.add_argument("--unet", default=None, help="diffusers UNet2DConditionModel folder")
    q.add_argument("--vae", default=None, help="diffusers AutoencoderKL folder")
    q.add_argument("--llm", default=None, help="transformers LLaMA-family causal LM folder")
    q.add_argument("--peft", default=None, help="PEFT LoRA adapter folder (q_proj, v_proj)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=run_checkpoint_import)
    q = csub.add_parser(
        "export-diffusers", help="the UNet and the VAE as diffusers folders", formatter_class=fmt
    )
    q.add_argument("checkpoint")
    q.add_argument("--out", required=True)
    q.set_defaults(func=run_checkpoint_export_diffusers)
    q = csub.add_parser(
        "export-peft",
        help="the personalizer's LLM (transformers) and its LoRA (PEFT adapter)",
        formatter_class=fmt,
    )
    q.add_argument("checkpoint")
    q.add_argument("--out", required=True)
    q.set_defaults(func=run_checkpoint_export_peft)

    p = sub.add_parser(
        "evaluate", help="metrics, baselines and ablations with CIs", formatter_class=fmt
    )
    from pigeon.evaluation.options import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(p)
    p.set_defaults(func=run_evaluate)

    p = sub.add_parser("config", help="config tools", formatter_class=fmt)
    csub = p.add_subparsers(dest="config_command", required=True)
    q = csub.add_parser("show", help="print a resolved config", formatter_class=fmt)
    q.add_argument("--preset", default="tiny")
    q.add_argument("--checkpoint", default=None)
    q.add_argument("--set", action="append", metavar="KEY=VALUE")
    q.set_defaults(func=run_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from pigeon.checkpoint import CheckpointError
    from pigeon.config import ConfigError
    from pigeon.core.deadline import DeadlineExceeded
    from pigeon.core.images import ImageError
    from pigeon.data.emojiprefs import EmojiPrefsError
    from pigeon.data.user_data import UserDataError
    from pigeon.evaluation.errors import EvaluationError
    from pigeon.export.errors import ExportError
    from pigeon.inference.pipeline import RequestError
    from pigeon.serving.client import ClientError
    from pigeon.serving.server import ServerError
    from pigeon.training.loop import TrainingError

    try:
        summary = args.func(args)
    except (
        UserDataError,
        EmojiPrefsError,
        ConfigError,
        CheckpointError,
        ImageError,
        RequestError,
        DeadlineExceeded,
        ExportError,
        EvaluationError,
        ServerError,
        ClientError,
        TrainingError,
        OSError,
    ) as exc:
        print(f"pigeon {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
