"""The main job end to end, from a fresh clone: `make demo` runs `python -m pigeon.demo`.

    [1/6] data      EmojiPrefs from the open emoji sets (npm); reused when already built
    [2/6] model     the `small` checkpoint committed in checkpoints/small (hash-checked), or with
                    --train-tiny the `tiny` training recipe, every stage; reused when already trained
    [3/6] export    validated ONNX, published as version 1 of a Triton model repository
    [4/6] serve     the real tritonserver on 127.0.0.1
    [5/6] generate  8 test users through the gRPC client
    [6/6] report    demo/report.html (history | reference | generated | ground truth, metrics,
                    latency per request) and demo/grid.png; the server is stopped

A failure names the step and what to do. A second run reuses what the first built.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pigeon.files import write_atomic

STEPS = 6
COMMITTED = Path(__file__).resolve().parents[1] / "checkpoints" / "small"


class DemoError(RuntimeError):
    pass


def step(n: int, name: str, what: str) -> float:
    print(f"[{n}/{STEPS}] {name:<8} {what}", flush=True)
    return time.perf_counter()


def done(start: float, detail: str = "") -> None:
    print(f"        done in {time.perf_counter() - start:.1f}s {detail}", flush=True)


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    from PIL import Image

    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_data(out: Path) -> Path:
    from pigeon.data.emojiprefs import build_emojiprefs

    if (out / "dataset.json").exists():
        return out
    if shutil.which("npm") is None:
        raise DemoError(
            "step data: npm is not installed; install Node.js (apt-get install npm) or "
            "build EmojiPrefs elsewhere and pass --data DIR"
        )
    build_emojiprefs(out, 64, log=lambda message: None)
    return out


def run_summary(run: Path) -> dict:
    """Per training stage: steps, first and last loss, best validation loss and seconds (log.jsonl)."""
    summary = {}
    from pigeon.training.stages import STAGES

    for stage in STAGES:
        path = run / stage / "log.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        losses = [r for r in rows if "loss" in r]
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        summary[stage] = {
            "steps": losses[-1]["step"] + 1 if losses else 0,
            "first_loss": losses[0]["loss"] if losses else None,
            "last_loss": losses[-1]["loss"] if losses else None,
            "best_val_loss": min(vals) if vals else None,
            "seconds": losses[-1].get("elapsed_s") if losses else None,
        }
    return summary


def obtain_model(run: Path, data: Path, train_tiny: bool) -> tuple[Path, str, dict]:
    """The committed `small` checkpoint (its files checked against their hashes), or a `tiny` model
    trained here; returns the checkpoint, the preset name and the training summary."""
    from pigeon.checkpoint import load_checkpoint
    from pigeon.training.loop import train_all

    if not train_tiny and (COMMITTED / "pipeline.json").exists():
        load_checkpoint(COMMITTED)  # raises on any altered or missing file
        return COMMITTED, "small", json.loads((COMMITTED / "training.json").read_text())["stages"]
    best = run / "dpo" / "best"
    if not (best / "pipeline.json").exists():
        train_all(run, preset_name="tiny", data_source=str(data), progress=True)
    return best, "tiny", run_summary(run)


def publish(checkpoint: Path, repository: Path) -> Path:
    """Version 1 of the repository, re-exported only when it was built from another checkpoint."""
    from pigeon.checkpoint import load_checkpoint
    from pigeon.config import ServingConfig
    from pigeon.export.publish import export_all
    from pigeon.serving.repository import write_configs

    manifest = repository / "cpu" / "unet" / "1" / "manifest.json"
    ckpt = load_checkpoint(checkpoint)
    if (
        not manifest.exists()
        or json.loads(manifest.read_text())["checkpoint_sha256"] != ckpt.digest
    ):
        shutil.rmtree(repository, ignore_errors=True)
        export_all(checkpoint, repository, 1)
    else:  # reused: it takes this Pigeon's configs (an older one's may lack a tensor it wires)
        write_configs(repository / "cpu", ckpt.config, ServingConfig(), "cpu")
    return repository / "cpu"


def generate(server, data: Path, users: int) -> list[dict]:
    from pigeon.core.images import load_image
    from pigeon.data.emojiprefs import load_emojiprefs, load_manifest
    from pigeon.serving.client import PigeonClient

    dataset = load_emojiprefs(data)
    rows = []
    with PigeonClient(server.grpc_url, "grpc", timeout_s=120) as client:
        for user in load_manifest(data / "test.jsonl")[:users]:
            history, reference, target = dataset.user_images(user)
            result = client.generate(
                [png_bytes(h) for h in history], png_bytes(reference), user.text, seed=0
            )
            rows.append(
                {
                    "user": user,
                    "history": history,
                    "reference": reference,
                    "target": target,
                    "generated": load_image(result.image_png),
                    "latency_s": result.latency_s,
                    "timings": result.timings,
                }
            )
    return rows


def l1(a: np.ndarray, b: np.ndarray) -> float:
    from PIL import Image

    if a.shape != b.shape:
        a = np.asarray(Image.fromarray(a).resize(b.shape[1::-1], Image.Resampling.BICUBIC))
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255.0)


MODEL_TEXT = {
    "tiny": "the <b>tiny</b> recipe, trained here for a few seconds on EmojiPrefs (every stage: VAE, "
    "tokenizer + diffusion decoder, LMM, masked preference reconstruction, DPO). At this scale the "
    "outputs are not recognisable stickers; the page shows the whole path working.",
    "small": "the <b>small</b> checkpoint committed in <code>checkpoints/small</code> (every stage of "
    "the recipe on EmojiPrefs on a 2-core CPU; how it was trained: checkpoints/small/TRAINING.md). "
    "Denoising starts from the reference, recoloured with the history's palette and noised to the "
    "checkpoint's <code>scheduler.strength</code> (image-to-image): the layout comes from the "
    "reference, the style from that palette and from the personalized tokens. On 200 test users it "
    "draws the user's style about half the time and keeps the reference's concept about half the "
    "time; the strokes are still blurred (docs/RESULTS.md §19).",
}


def report(rows: list[dict], out: Path, model: str, training: dict, latencies: list[float]) -> None:
    def img(image: np.ndarray, title: str = "") -> str:
        data = base64.b64encode(png_bytes(image)).decode()
        return f'<img src="data:image/png;base64,{data}" title="{html.escape(title)}" class="px">'

    lines = []
    for r in rows:
        u = r["user"]
        history = "".join(
            img(h, f"{c} / {s}") for h, (c, s) in zip(r["history"], u.history, strict=True)
        )
        lines.append(
            f"<tr><td>{html.escape(u.user_id)}<br><small>likes <b>{html.escape(u.style)}</b>"
            f"</small></td><td>{history}</td><td>{img(r['reference'], u.reference[1])}</td>"
            f"<td>{img(r['generated'])}</td><td>{img(r['target'], u.target[1])}</td>"
            f"<td>{html.escape(u.text)}</td><td>{l1(r['generated'], r['target']):.3f}</td>"
            f"<td>{l1(r['reference'], r['target']):.3f}</td>"
            f"<td>{r['latency_s'] * 1e3:.0f} ms</td></tr>"
        )
    p50 = float(np.percentile(latencies, 50))
    stages = "".join(
        f"<li>{s}: {t['steps']} steps, loss {t['first_loss']:.3f} → {t['last_loss']:.3f}"
        + (f", {t['seconds'] / 60:.1f} min" if t.get("seconds") else "")
        + "</li>"
        for s, t in training.items()
        if t.get("first_loss") is not None
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Pigeon demo</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{padding:4px 8px;vertical-align:middle}}
img.px{{width:64px;height:64px;image-rendering:pixelated;margin:1px;border:1px solid #ddd}}
tr:nth-child(even){{background:#f6f6f6}}</style></head><body>
<h1>Pigeon demo: personalized stickers served by Triton</h1>
<p>Model: {MODEL_TEXT[model]} {len(rows)} test users of the fixed manifest, sent through the real
tritonserver (ensemble + BLS) over gRPC.</p>
<p>Latency per request: p50 {p50 * 1e3:.0f} ms over {len(latencies)} requests (2-core CPU).
L1 = mean absolute pixel difference to the ground truth (lower is better); "ref L1" is the same for
simply copying the reference.</p>
<table><tr><th>user</th><th>history (oldest first)</th><th>reference</th><th>generated</th>
<th>ground truth</th><th>instruction</th><th>L1</th><th>ref L1</th><th>latency</th></tr>
{"".join(lines)}</table><h2>Training</h2><ul>{stages}</ul></body></html>"""
    write_atomic(out / "report.html", page)
    grid_rows = []
    for r in rows:
        cells = [*r["history"], r["reference"], r["generated"], r["target"]]
        size = r["target"].shape[0]
        from PIL import Image

        cells = [np.asarray(Image.fromarray(c).resize((size, size))) for c in cells]
        grid_rows.append(np.concatenate(cells, axis=1))
    (out / "grid.png").write_bytes(png_bytes(np.concatenate(grid_rows, axis=0), scale=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo")
    parser.add_argument("--data", default=None, help="an EmojiPrefs folder (default: build one)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument(
        "--train-tiny",
        action="store_true",
        help="train the tiny recipe here instead of using the committed small checkpoint",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    current = "data"
    try:
        t = step(1, "data", "EmojiPrefs (open emoji sets via npm)")
        data = build_data(Path(args.data) if args.data else out / "data" / "emojiprefs")
        done(t, str(data))
        current = "model"
        what = "the tiny recipe (vae, image, lmm, sft, dpo)"
        if not args.train_tiny and (COMMITTED / "pipeline.json").exists():
            what = "the committed small checkpoint, hash-checked"
        t = step(2, "model", what)
        checkpoint, model, training = obtain_model(out / "run", data, args.train_tiny)
        done(t, str(checkpoint))
        current = "export"
        t = step(3, "export", "ONNX per component, validated, published as version 1")
        repository = publish(checkpoint, out / "triton_models")
        done(t, str(repository))
        current = "serve"
        t = step(4, "serve", "start tritonserver on 127.0.0.1")
        from pigeon.serving.server import TritonServer

        with TritonServer(repository) as server:
            # as `pigeon serve` does: the report's first user is not the cold request
            warm_up_s = server.warm_up()
            done(t, f"grpc {server.grpc_url}, warmed up in {warm_up_s:.1f} s")
            current = "generate"
            t = step(5, "generate", f"{args.users} test users through the gRPC client")
            rows = generate(server, data, args.users)
            done(t)
        current = "report"
        t = step(6, "report", "demo/report.html and demo/grid.png")
        report(rows, out, model, training, [r["latency_s"] for r in rows])
        done(t, str(out / "report.html"))
    except Exception as exc:  # the step is named; the cause is shown; the exit code is non-zero
        print(f"demo failed at step '{current}': {exc.__class__.__name__}: {exc}", file=sys.stderr)
        print(
            "fix the cause above and run `make demo` again; finished steps are reused",
            file=sys.stderr,
        )
        return 1
    print(json.dumps({"report": str(out / "report.html"), "grid": str(out / "grid.png")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
