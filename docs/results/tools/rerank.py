"""Rule 18 (docs/results/small18-rerank/rule18.md): the shipped checkpoint's best of four samples per
user, picked by its own history encoder and condition adapter, on the first USERS validation users.

    PYTHONPATH=. python docs/results/tools/rerank.py [USERS]
"""

import sys

import numpy as np
from tqdm import tqdm

from pigeon.evaluation.chain import markdown, score_rows
from pigeon.evaluation.data import load_eval_data
from pigeon.evaluation.evaluate import Scorer
from pigeon.evaluation.external import External
from pigeon.evaluation.methods import evaluation_requests, generated_images, pooled_condition
from pigeon.evaluation.metric_nets import MetricNets
from pigeon.inference.pipeline import PigeonPipeline

SAMPLES, SEED_STRIDE = 4, 1000
users = int(sys.argv[1]) if len(sys.argv) > 1 else 200
data = load_eval_data("data/emojiprefs", "val", limit=users)
pipe = PigeonPipeline.from_checkpoint("checkpoints/small")
config = pipe.config


samples = []  # SAMPLES x (users, H, W, 3)
for k in range(SAMPLES):
    requests = evaluation_requests(data, data.cases, config, seed=k * SEED_STRIDE)
    samples.append(generated_images(pipe, requests, f"seed offset {k * SEED_STRIDE}"))

to_history, to_reference = np.zeros((users, SAMPLES)), np.zeros((users, SAMPLES))
for u, request in enumerate(tqdm(requests, desc="embeddings")):
    candidates = pooled_condition(pipe, [s[u] for s in samples])  # (SAMPLES, D)
    history = pooled_condition(pipe, list(request.history))  # (N, D)
    reference = pooled_condition(pipe, [request.reference])[0]  # (D,)
    to_history[u] = (candidates @ history.T).mean(1)
    to_reference[u] = candidates @ reference

stacked = np.stack(samples, axis=1)  # (users, SAMPLES, H, W, 3)
users_index = np.arange(users)
rows = {f"seed offset {k * SEED_STRIDE}": samples[k] for k in range(SAMPLES)}
rows["picked: history"] = stacked[users_index, to_history.argmax(1)]
rows["picked: history+reference"] = stacked[users_index, (to_history + to_reference).argmax(1)]
print("picked sample counts, history:", np.bincount(to_history.argmax(1), minlength=SAMPLES))
print(
    "picked sample counts, history+reference:",
    np.bincount((to_history + to_reference).argmax(1), minlength=SAMPLES),
)
scorer = Scorer(data, MetricNets.load(), enl0=None, external=External())
scores = score_rows(scorer, scorer.case_set(data.cases), rows)
print(markdown(scores, f"# best of {SAMPLES} samples, {users} validation users"))
