"""What StyleNet tolerates and what the VAE costs (docs/RESULTS.md §15): the first USERS validation
targets blurred, downsampled, quantised and noised, and the committed checkpoint's VAE round trip,
each scored like `pigeon evaluate --chain`'s rows.

    PYTHONPATH=. python docs/results/tools/style_sensitivity.py [USERS]
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

from pigeon.checkpoint import load_checkpoint
from pigeon.evaluation.chain import round_trip
from pigeon.evaluation.data import load_eval_data
from pigeon.evaluation.evaluate import Scorer
from pigeon.evaluation.external import External
from pigeon.evaluation.metric_nets import MetricNets
from pigeon.inference.pipeline import PigeonPipeline
from pigeon.inference.runners import TorchRunner

users = int(sys.argv[1]) if len(sys.argv) > 1 else 64
data = load_eval_data("data/emojiprefs", "val", limit=users)
scorer = Scorer(data, MetricNets.load(), enl0=None, external=External())
case_set = scorer.case_set(data.cases)
truth = data.truth(data.cases)


def score(name: str, images: np.ndarray) -> None:
    per, _, _ = scorer.score(np.ascontiguousarray(images), case_set, light=True)
    print(f"{name:28s} StyleAcc {per['style_acc'].mean():.3f} R@5 {per['concept_r5'].mean():.3f}")


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    r = int(3 * sigma) + 1
    k = torch.exp(-(torch.arange(-r, r + 1).float() ** 2) / (2 * sigma**2))
    k /= k.sum()
    x = F.conv2d(
        F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3
    )
    x = F.conv2d(
        F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3
    )
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def down_up(images: np.ndarray, factor: int) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    size = x.shape[-1]
    x = F.interpolate(
        F.interpolate(x, size=size // factor, mode="area"), size=size, mode="bilinear"
    )
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


score("ground truth", truth)
score("blur 0.5", blur(truth, 0.5))
score("blur 1.0", blur(truth, 1.0))
score("down-up x2", down_up(truth, 2))
score("quantize 32 levels", (truth // 8 * 8 + 4).astype(np.uint8))
noise = np.random.default_rng(0).normal(0, 8, truth.shape)
score("gauss noise 8", np.clip(truth + noise, 0, 255).astype(np.uint8))
ckpt = load_checkpoint("checkpoints/small")
model = ckpt.model.float().eval()
pipe = PigeonPipeline(model.config, ckpt.tokenizer, TorchRunner(model, "cpu"))
with torch.no_grad():
    trip = np.concatenate([round_trip(pipe, truth[i : i + 16]) for i in range(0, len(truth), 16)])
score("committed VAE round trip", trip)
