"""Stage 2 preference pairs (the paper's stage 2): candidates at several reference mask ratios, ranked.

For each training user, the stage-1 model generates one candidate per reference mask ratio alpha_r
(`TrainConfig.dpo_ratios`), each rendered with a few denoising steps. A personalization scorer ranks
them: the mean cosine similarity between the candidate's and each history image's features from the
model's own history encoder (its ViT, trained in stage 0b on the training split only). It is not the
evaluation metric (evaluation uses separately trained style and concept networks). chosen = the best,
rejected = the worst, as the official code pairs max and min history similarity; pairs whose two
candidates generated the same tokens are dropped.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
from pigeon.inference.runners import TorchRunner
from pigeon.inference.scoring import personalization_scores

log = logging.getLogger(__name__)
SEED_ATTEMPTS = 4


def candidate_requests(user, config, seed: int) -> list[GenerationRequest]:
    """One request per reference mask ratio. `dpo_seeds="shared"`: all with the same seed, so the
    candidates share their sampling noise and initial latents and differ by the mask ratio alone
    (the official code fixes the seed across a user's candidates). "per_candidate": seeds
    seed*k .. seed*k+k-1, for a model too untrained for the mask ratio to change its tokens."""
    reference = user.target if config.reference == "target" else user.reference
    k = len(config.dpo_ratios)
    return [
        GenerationRequest(
            history=user.history,
            reference=reference,
            text=user.text,
            seed=seed if config.dpo_seeds == "shared" else seed * k + j,
            steps=config.dpo_steps_per_candidate,
            reference_mask_ratio=float(r),
        )
        for j, r in enumerate(config.dpo_ratios)
    ]


def build_pairs(model, tokenizer, data, config, device: str = "cpu") -> list[dict]:
    """`config.dpo_pairs` users -> [{user, chosen, rejected, scores}] (codes as int64 arrays)."""
    model.eval()
    # candidates are sampled (the official code beam-samples), so the mask ratios give distinct ones
    sampling = dataclasses.replace(model.config.generation, strategy="top_k")
    pipe = PigeonPipeline(
        dataclasses.replace(model.config, generation=sampling),
        tokenizer,
        TorchRunner(model, device),
    )
    rng = np.random.default_rng([config.seed, 7_777])
    users = data.users(rng, config.dpo_pairs, config.history_length, config.noise_ratio)
    pairs = []
    for i, user in enumerate(users):
        # a user whose candidates all generate the same tokens under one seed gives no pair; its
        # candidates are drawn again under the next seed (still one seed for all of them)
        for attempt in range(SEED_ATTEMPTS):
            results = pipe(candidate_requests(user, config, seed=i + attempt * len(users)))
            scores = personalization_scores(
                model, np.stack([r.image for r in results]), np.stack(user.history)
            )
            best, worst = int(np.argmax(scores)), int(np.argmin(scores))
            if not np.array_equal(results[best].tokens, results[worst].tokens):
                pairs.append(
                    {
                        "user": user,
                        "chosen": results[best].tokens,
                        "rejected": results[worst].tokens,
                        "scores": scores.tolist(),
                    }
                )
                break
    if not pairs:
        raise RuntimeError(
            f"no preference pair: every user's {len(config.dpo_ratios)} candidates "
            f"generated the same tokens under {SEED_ATTEMPTS} seeds; add mask ratios or users"
        )
    log.info("dpo: %d pairs from %d users", len(pairs), len(users))
    return pairs
