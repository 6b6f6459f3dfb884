"""Rule 17 (docs/results/small16-history-majority/rule17.md): the shipped checkpoint's generated
images on the first USERS validation users, one row per guidance:strength pair, same seeds.

    PYTHONPATH=. python docs/results/tools/sampling_sweep.py USERS 7:0.6 5:0.6 ...
"""

import sys

from pigeon.evaluation.chain import markdown, score_rows
from pigeon.evaluation.data import load_eval_data
from pigeon.evaluation.evaluate import Scorer
from pigeon.evaluation.external import External
from pigeon.evaluation.methods import evaluation_requests, generated_images
from pigeon.evaluation.metric_nets import MetricNets
from pigeon.inference.pipeline import PigeonPipeline

users = int(sys.argv[1])
settings = [tuple(float(x) for x in a.split(":")) for a in sys.argv[2:]]
data = load_eval_data("data/emojiprefs", "val", limit=users)
pipe = PigeonPipeline.from_checkpoint("checkpoints/small")
rows = {}
for guidance, strength in settings:
    requests = evaluation_requests(
        data, data.cases, pipe.config, guidance=guidance, strength=strength
    )
    name = f"generated, guidance {guidance:g}, strength {strength:g}"
    rows[name] = generated_images(pipe, requests, name)
scorer = Scorer(data, MetricNets.load(), enl0=None, external=External())
scores = score_rows(scorer, scorer.case_set(data.cases), rows)
print(markdown(scores, f"# sampling settings, {users} validation users"))
