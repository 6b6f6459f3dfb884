"""Rule 16 (docs/results/small16-history-majority/rule16.md): the shipped checkpoint's recoloured
start from every history image against the history's majority style, on the first USERS
validation users at the shipped settings, recoloured reference alone and generated.

The majority: the ceil(N/2) history images whose pooled condition embedding (the checkpoint's own
history encoder and condition adapter) has the highest mean cosine similarity to the other history
images; with N < 3, every image.

    PYTHONPATH=. python docs/results/tools/history_majority.py [USERS]
"""

import sys

import numpy as np

from pigeon.core.images import to_model_input, to_uint8
from pigeon.core.style_start import recolour
from pigeon.evaluation.chain import markdown, score_rows
from pigeon.evaluation.data import load_eval_data
from pigeon.evaluation.evaluate import Scorer
from pigeon.evaluation.external import External
from pigeon.evaluation.methods import evaluation_requests, generated_images, pooled_condition
from pigeon.evaluation.metric_nets import MetricNets
from pigeon.inference.pipeline import PigeonPipeline

users = int(sys.argv[1]) if len(sys.argv) > 1 else 200
data = load_eval_data("data/emojiprefs", "val", limit=users)
pipe = PigeonPipeline.from_checkpoint("checkpoints/small")
config = pipe.config
requests = evaluation_requests(data, data.cases, config)


def majority(history: list[np.ndarray]) -> list[np.ndarray]:
    pooled = pooled_condition(pipe, history)  # (N, D), unit rows
    n = len(history)
    if n < 3:
        return list(history)
    mean_similarity = ((pooled @ pooled.T).sum(1) - 1.0) / (n - 1)  # (N,), itself left out
    kept = np.sort(np.argsort(-mean_similarity, kind="stable")[: (n + 1) // 2])
    return [history[i] for i in kept]


def start(reference: np.ndarray, history: list[np.ndarray]) -> np.ndarray:
    size = config.image_size
    return recolour(
        to_model_input(reference, size),
        np.stack([to_model_input(h, size) for h in history]),
        config.scheduler.style_start,
    )


class MajorityPipeline(PigeonPipeline):
    def reference_pixels(self, requests, strength, from_history=True):
        return np.stack([start(r.reference, majority(r.history)) for r in requests])


rows = {
    "recoloured reference alone, all history": to_uint8(
        np.stack([start(r.reference, r.history) for r in requests])
    ),
    "recoloured reference alone, history majority": to_uint8(
        np.stack([start(r.reference, majority(r.history)) for r in requests])
    ),
}
candidates = {
    "generated, all history (shipped)": pipe,
    "generated, history majority": MajorityPipeline(config, pipe.prompts.tokenizer, pipe.runner),
}
for name, pipeline in candidates.items():
    rows[name] = generated_images(pipeline, requests, name)
scorer = Scorer(data, MetricNets.load(), enl0=None, external=External())
scores = score_rows(scorer, scorer.case_set(data.cases), rows)
print(
    markdown(
        scores, f"# the start from all history images or the majority, {users} validation users"
    )
)
