"""The generated image at a checkpoint's own settings on the first USERS validation users, one row
per seed offset and their mean (docs/RESULTS.md §14 measured how far the seed alone moves it).

    PYTHONPATH=. python docs/results/tools/seed_rows.py CHECKPOINT USERS OFFSET [OFFSET ...]
"""

import sys

import numpy as np

from pigeon.evaluation.chain import markdown, score_rows
from pigeon.evaluation.data import load_eval_data
from pigeon.evaluation.evaluate import Scorer
from pigeon.evaluation.external import External
from pigeon.evaluation.methods import evaluation_requests, generated_images
from pigeon.evaluation.metric_nets import MetricNets
from pigeon.inference.pipeline import PigeonPipeline

checkpoint, users, offsets = sys.argv[1], int(sys.argv[2]), [int(o) for o in sys.argv[3:]]
data = load_eval_data("data/emojiprefs", "val", limit=users)
pipe = PigeonPipeline.from_checkpoint(checkpoint)
rows = {
    f"seed offset {k}": generated_images(
        pipe, evaluation_requests(data, data.cases, pipe.config, seed=k), f"seed offset {k}"
    )
    for k in offsets
}
scorer = Scorer(data, MetricNets.load(), enl0=None, external=External())
scores = score_rows(scorer, scorer.case_set(data.cases), rows)
print(markdown(scores, f"# {checkpoint}, {users} validation users"))
for key in ("style_acc", "concept_r5"):
    mean = np.mean([row[key]["mean"] for row in scores.values()])
    print(f"mean over offsets {offsets}, {key}: {mean:.4f}")
