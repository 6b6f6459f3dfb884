"""Quality of one artifact folder at several sampler settings, on the first 64 validation users,
scored like `benchmarks.variants` (StyleAcc, ConceptR@5, SSIM with 95% bootstrap intervals). How the
`fast` variant's sampling defaults were chosen (benchmarks/README.md, "The fast variant").

    PYTHONPATH=. python docs/results/tools/fast_settings.py ARTIFACTS SAMPLER:STEPS [SAMPLER:STEPS ...]
    e.g. runs/bench-fast/fast ddim:10 ddim:15 dpmpp_2m:10 dpmpp_2m:20
"""

import dataclasses
import sys

import numpy as np

from benchmarks.variants import quality_requests, quality_scorer, quality_scores
from pigeon.checkpoint import load_checkpoint
from pigeon.config import ServingConfig
from pigeon.inference.pipeline import PigeonPipeline
from pigeon.inference.runners import OrtOptions, OrtRunner

folder, settings = sys.argv[1], [a.split(":") for a in sys.argv[2:]]
ckpt = load_checkpoint("checkpoints/small")
data, scorer, case_set = quality_scorer("data/emojiprefs", 64, "val")
cases = quality_requests(data, data.cases, ckpt.config, None)
runner = OrtRunner.from_artifacts(folder, ckpt.config, OrtOptions.from_serving(ServingConfig()))
pipe = PigeonPipeline(ckpt.config, ckpt.tokenizer, runner)
for sampler, steps in settings:
    asked = [dataclasses.replace(r, sampler=sampler, steps=int(steps)) for r in cases]
    images = np.stack([pipe(r)[0].image for r in asked])
    print(folder, sampler, steps, quality_scores(images, data, scorer, case_set), flush=True)
