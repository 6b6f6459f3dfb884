"""The recoloured reference alone, with no model (docs/RESULTS.md §12): how much of the style the
history's colours bring before any denoising step, per `scheduler.style_start` method, scored like
the chain (StyleAcc / ConceptR@5, 95% bootstrap intervals over users).

    PYTHONPATH=. python docs/results/tools/style_start_alone.py [USERS]
"""

import sys

import numpy as np

from pigeon.config import preset
from pigeon.core.images import to_model_input, to_uint8
from pigeon.core.style_start import STYLE_STARTS, recolour
from pigeon.evaluation.chain import markdown, score_rows
from pigeon.evaluation.data import load_eval_data
from pigeon.evaluation.evaluate import Scorer
from pigeon.evaluation.external import External
from pigeon.evaluation.methods import evaluation_requests
from pigeon.evaluation.metric_nets import MetricNets

users = int(sys.argv[1]) if len(sys.argv) > 1 else 64
data = load_eval_data("data/emojiprefs", "val", limit=users)
config = preset("small")
requests = evaluation_requests(data, data.cases, config)
size = data.size
rows = {}
for method in STYLE_STARTS:
    rows[f"reference, {method}"] = to_uint8(
        np.stack(
            [
                recolour(
                    to_model_input(r.reference, size),
                    np.stack([to_model_input(h, size) for h in r.history]),
                    method,
                )
                for r in requests
            ]
        )
    )
scorer = Scorer(data, MetricNets.load(), enl0=None, external=External())
scores = score_rows(scorer, scorer.case_set(data.cases), rows)
print(markdown(scores, f"# The recoloured reference alone, {users} validation users"))
