"""Evaluation outputs: results.json, results.md (tables with confidence intervals), grid.png (outputs
of every method next to history, reference and ground truth), robustness.png, per_case.npz."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pigeon.evaluation.options import METRICS
from pigeon.files import write_atomic

CELL = 64
HEADER = 16


def fmt(stat: dict | None, decimals: int) -> str:
    """'0.812 [0.790, 0.833]'; '-' when absent or undefined."""
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "-"
    m, lo, hi = stat["mean"], stat.get("lo"), stat.get("hi")
    if lo is None or not math.isfinite(lo):
        return f"{m:.{decimals}f}"
    return f"{m:.{decimals}f} [{lo:.{decimals}f}, {hi:.{decimals}f}]"


def metric_table(report: dict, table: str) -> list[str]:
    rows = [m for m in METRICS if m[3] == table]
    methods = report["methods"]
    present = [m for m in rows if any(m[0] in r["metrics"] for r in methods.values())]
    if not present or not methods:
        return []
    head = ["method"] + [f"{label} {'↑' if up else '↓'}" for _, label, up, _, _ in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in methods.items():
        cells = [name] + [fmt(r["metrics"].get(key), dec) for key, _, _, _, dec in present]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    p = report["provenance"]
    d = p["data"]
    cfg = p["config"]
    lines = [
        f"# Pigeon evaluation: {d['name']} {d['split']} ({d['users']} users)",
        "",
        f"Data: `{d['root']}` (sha256 `{str(d['content_sha256'])[:16]}…`, {d['gallery_concepts']} "
        f"gallery concepts, {d['image_size']} px). Seed {cfg['seed']}; {int(cfg['level'] * 100)}% "
        f"bootstrap intervals over users: percentile intervals of means ({cfg['bootstrap']} resamples), "
        f"bias-corrected percentile intervals of the set-level FD/KID ({cfg['set_bootstrap']} "
        "resamples, each recomputing the statistic).",
    ]
    if p.get("command"):
        lines += ["", f"Command: `{p['command']}`"]
    lines += ["", "## Main table", "", *metric_table(report, "main")]
    more = metric_table(report, "more")
    if more:
        lines += ["", "## More metrics", "", *more]
    pig = metric_table(report, "pigeon")
    lines += ["", "## Pigeon's metric list (local CLIP/DINOv2/Inception/LPIPS weights)", ""]
    lines += pig if pig else ["None ran."]
    if report["skipped_metrics"]:
        lines += ["", "Skipped metrics:", ""]
        lines += [f"- {m}: {why}" for m, why in report["skipped_metrics"].items()]
    lines += [
        "",
        "## Methods",
        "",
        "| method | what | s/img generate (CPU s) | s/img score (CPU s) | notes |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["methods"].items():
        n = r["notes"]
        extra = []
        if n.get("checkpoint"):
            extra.append(f"`{n['checkpoint']}`")
        if n.get("overrides"):
            extra.append("set " + ", ".join(n["overrides"]))
        if n.get("request"):
            extra.append("request " + ", ".join(f"{k}={v}" for k, v in n["request"].items()))
        if n.get("info"):
            extra.append(n["info"])
        if n.get("ratios"):
            extra.append(f"ratios {n['ratios']}")
        if n.get("model_image_size") and n["model_image_size"] != d["image_size"]:
            extra.append(f"generated at {n['model_image_size']} px, upsampled")
        if n.get("projected_full_run_minutes") is not None:
            extra.append(f"full split ≈ {n['projected_full_run_minutes']} min")
        if n.get("copies_of_reference") or n.get("copies_of_history"):
            extra.append(f"copies: {n['copies_of_reference']} ref, {n['copies_of_history']} hist")
        lines.append(
            f"| {name} | {r['description']} | {n.get('seconds_per_image', 0):.4f} "
            f"({n.get('cpu_seconds_per_image', 0):.4f}) | {n.get('score_seconds_per_image', 0):.4f} "
            f"({n.get('score_cpu_seconds_per_image', 0):.4f}) | {'; '.join(extra)} |"
        )
    if report["skipped_methods"]:
        lines += ["", "Skipped methods:", ""]
        lines += [f"- {m}: {why}" for m, why in report["skipped_methods"].items()]
    rob = report.get("robustness") or {}
    if rob.get("methods"):
        lines += [
            "",
            f"## Robustness ({rob['users']} redrawn users per point; StyleAcc / "
            "ConceptR@1 with intervals)",
            "",
        ]
        for curve, fixed in (("noise_ratio", "history_length"), ("history_length", "noise_ratio")):
            block = rob[curve]
            points = list(block["points"])
            lines += [
                f"{curve} (at {fixed} = {block[fixed]}):",
                "",
                "| method | " + " | ".join(f"{curve}={v}" for v in points) + " |",
                "|---|" + "---|" * len(points),
            ]
            for m in rob["methods"]:
                cells = []
                for v in points:
                    r = block["points"][v].get(m)
                    if not r:
                        cells.append("-")
                        continue
                    cell = f"{fmt(r['style_acc'], 3)} / {fmt(r['concept_r1'], 3)}"
                    if r.get("history_truncated_to"):
                        cell += f" (history cut to {r['history_truncated_to']})"
                    cells.append(cell)
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    nets = report.get("metric_nets", {})
    if nets:
        lines += ["## Metric nets (trained on training-split concepts only; own test accuracy)", ""]
        st = nets.get("style", {})
        if st:
            t = st["test"]
            lines.append(
                f"StyleNet: accuracy {t.get('accuracy', float('nan')):.3f} on test concepts "
                f"({t.get('accuracy_half_resolution', float('nan')):.3f} after a half-resolution "
                f"round trip); weights `{str(st.get('weights_sha256'))[:16]}…`, seed {st.get('seed')}"
                + ("" if st.get("same_data") else "; **trained on a different data build**")
            )
            cm = t.get("confusion_matrix")
            if cm:
                styles = cm["styles"]
                lines += [
                    "",
                    "Confusion matrix (rows: true style, columns: predicted):",
                    "",
                    "| true \\ pred | " + " | ".join(styles) + " | acc |",
                    "|---|" + "---|" * (len(styles) + 1),
                ]
                for s, row in zip(styles, cm["counts"], strict=True):
                    acc = row[styles.index(s)] / max(1, sum(row))
                    lines.append(f"| {s} | " + " | ".join(map(str, row)) + f" | {acc:.2f} |")
        ct = nets.get("concept", {})
        if ct:
            t = ct["test"]
            lines += [
                "",
                f"ConceptNet: cross-style R@1 {t.get('cross_style_r1', float('nan')):.3f}, "
                f"prototype R@1 {t.get('prototype_r1', float('nan')):.3f} / R@5 "
                f"{t.get('prototype_r5', float('nan')):.3f} (chance R@1 "
                f"{t.get('chance_r1', float('nan')):.4f}); weights "
                f"`{str(ct.get('weights_sha256'))[:16]}…`",
            ]
    files = report.get("files", {})
    shown = "".join(f", {files[k]}" for k in ("grid", "robustness") if k in files)
    lines += [
        "",
        f"Files: results.json (everything above), per_case.npz (per-user values){shown}.",
        "",
    ]
    return "\n".join(lines)


def _label(draw: ImageDraw.ImageDraw, x: int, text: str) -> None:
    draw.text((x + 2, 2), text[:10], fill=(0, 0, 0))


def grid(data, cs, outputs: dict[str, np.ndarray], rows: int) -> Image.Image:
    """Rows: users. Columns: history (up to 5), reference, ground truth, every method's output."""
    n = min(rows, len(cs.cases), *(len(v) for v in outputs.values())) if outputs else 0
    hist_cols = min(5, max((len(h) for h in cs.histories[:n]), default=0))
    names = ["hist"] * hist_cols + ["reference", "truth"] + list(outputs)
    canvas = Image.new("RGB", (CELL * len(names), HEADER + CELL * n), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        _label(draw, j * CELL, name if name != "hist" else f"hist {j + 1}")
    for i in range(n):
        c = cs.cases[i]
        hist = cs.histories[i][-hist_cols:]
        cells = list(hist) + [None] * (hist_cols - len(hist))
        cells += [data.image(c.reference), cs.truth[i]] + [v[i] for v in outputs.values()]
        for j, im in enumerate(cells):
            if im is not None:
                tile = Image.fromarray(im).resize((CELL, CELL), Image.Resampling.NEAREST)
                canvas.paste(tile, (j * CELL, HEADER + i * CELL))
    return canvas


def plot_robustness(rob: dict, path: Path) -> str | None:
    """Two panels (noise ratio, history length) of StyleAcc and ConceptR@1 with CI bands."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; robustness.png not drawn (tables are in results.md)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, curve in zip(axes, ("noise_ratio", "history_length"), strict=True):
        block = rob[curve]
        xs = [float(v) for v in block["points"]]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, m in enumerate(rob["methods"]):
            color = colors[k % len(colors)]  # one colour per method, one line style per metric
            for metric, style in (("style_acc", "-"), ("concept_r1", "--")):
                ys = [block["points"][v][m][metric] for v in block["points"]]
                ax.plot(
                    xs,
                    [y["mean"] for y in ys],
                    style,
                    marker="o",
                    color=color,
                    label=f"{m} {metric}",
                )
                ax.fill_between(
                    xs, [y["lo"] for y in ys], [y["hi"] for y in ys], alpha=0.12, color=color
                )
        ax.set_xlabel(curve.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{curve.replace('_', ' ')} ({rob['users']} users per point)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("StyleAcc (solid) / ConceptR@1 (dashed)")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_reports(out: Path, report: dict, data, cs, outputs: dict, per_case: dict) -> None:
    files = {}
    if outputs:
        grid(data, cs, outputs, report["provenance"]["config"]["grid_rows"]).save(out / "grid.png")
        files["grid"] = "grid.png"
    rob = report.get("robustness") or {}
    if rob.get("methods"):
        problem = plot_robustness(rob, out / "robustness.png")
        if problem:
            report["robustness"]["plot"] = problem
        else:
            files["robustness"] = "robustness.png"
    tmp = out / ".per_case.tmp.npz"
    np.savez_compressed(tmp, **per_case)
    tmp.replace(out / "per_case.npz")
    files.update(per_case="per_case.npz", markdown="results.md")
    report["files"] = files
    write_atomic(
        out / "results.json",
        json.dumps(_finite(report), indent=1, default=_default, allow_nan=False) + "\n",
    )
    write_atomic(out / "results.md", markdown(report))


def _finite(x):
    """NaN/inf -> None so that results.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)) and not math.isfinite(float(x)):
        return None
    return x


def _default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
