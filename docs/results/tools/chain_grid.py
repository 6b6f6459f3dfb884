"""A picture grid of the chain on the first 6 validation users (docs/RESULTS.md §10): 3 history images,
reference, UNet given the target's tokens at 1.0, generated at 1.0 and at STRENGTH, ground truth.

    PYTHONPATH=. python docs/results/tools/chain_grid.py CHECKPOINT OUT.png STRENGTH [STYLE_START]

STYLE_START (§12): the checkpoint's `scheduler.style_start` replaced for the drawing.
"""

import dataclasses
import sys

import numpy as np
from PIL import Image

from pigeon.checkpoint import load_checkpoint
from pigeon.evaluation.chain import chain_images
from pigeon.evaluation.data import load_eval_data
from pigeon.inference.pipeline import PigeonPipeline
from pigeon.inference.runners import TorchRunner

ckpt_path, out, strength = sys.argv[1], sys.argv[2], float(sys.argv[3])
ckpt = load_checkpoint(ckpt_path)
config = ckpt.config
if len(sys.argv) > 4:
    config = dataclasses.replace(
        config, scheduler=dataclasses.replace(config.scheduler, style_start=sys.argv[4])
    )
pipe = PigeonPipeline(config, ckpt.tokenizer, TorchRunner(ckpt.model))
data = load_eval_data("data/emojiprefs", "val", limit=6)
rows = chain_images(
    pipe, data, data.cases, [1.0, strength], links=("ground_truth", "target_tokens", "generated")
)
grid = []
for i, case in enumerate(data.cases):
    cells = [
        *data.history(case)[-3:],
        data.image(case.reference),
        rows["target_tokens@1"][i],
        rows["generated@1"][i],
        rows[f"generated@{strength:g}"][i],
        rows["ground_truth"][i],
    ]
    grid.append(np.concatenate(cells, axis=1))
Image.fromarray(np.concatenate(grid, axis=0)).resize(
    (grid[0].shape[1] * 2, len(grid) * grid[0].shape[0] * 2), Image.Resampling.NEAREST
).save(out)
print(out)
