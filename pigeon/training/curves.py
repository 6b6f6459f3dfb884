"""A stage's curves from its `log.jsonl`: training loss, validation loss and, where the stage logs
one, its link of the image chain (StyleAcc and ConceptR@5 on validation users), against the step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def read_log(path: str | Path) -> list[dict]:
    """The log's records; a run resumed after an interruption repeats steps, and the last
    record of a step wins."""
    records: dict[tuple[int, bool], dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[(r["step"], "val_loss" in r)] = r
    return [records[k] for k in sorted(records)]


def plot_curves(log_path: str | Path, out: str | Path, title: str = "") -> Path | None:
    """Draw `out` (PNG); None (and a log line) where matplotlib is missing or nothing is logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; %s not drawn", out)
        return None
    records = read_log(log_path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        return None
    linked = [r for r in val if "link_style_acc" in r]
    fig, axes = plt.subplots(1, 2 if linked else 1, figsize=(11 if linked else 6, 3.6))
    ax = axes[0] if linked else axes
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    if linked:
        ax2 = axes[1]
        steps = [r["step"] for r in linked]
        ax2.plot(steps, [r["link_style_acc"] for r in linked], "o-", label="StyleAcc")
        ax2.plot(steps, [r["link_concept_r5"] for r in linked], "s-", label="ConceptR@5")
        ax2.set_ylim(0, 1)
        ax2.set_xlabel("step")
        ax2.set_title(f"chain link: {linked[-1]['link']} (validation users)")
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
