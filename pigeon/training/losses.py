"""Losses as pure functions (docs/DESIGN.md, "Training stages"). Tested on their own.

L_diff = || eps_hat - eps ||^2                                    (or v-target)
         weighted per sample by min(SNR_t, gamma) / SNR_t under Min-SNR-gamma (v: / (SNR_t + 1))
L_VAE  = || x_hat - x ||_1 + w_kl KL(q(z|x) || N(0, I))
L_LM   = -1/|T| sum_{t in T} log p(y_t | y_<t)                   T: the labelled positions
L_DPO  = -log sigma(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error; with weights (batch,), the weighted mean of the per-sample errors."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    return (weights.float() * per_sample).mean()


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) per-sample weights for L_diff at signal-to-noise ratios snr
    (batch,): the low-noise timesteps, where the noisy latents alone give the answer, stop dominating
    the loss, so more of its gradient falls where the condition decides the image."""
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def vae_loss(
    reconstruction: torch.Tensor,
    images: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    kl_weight: float,
) -> torch.Tensor:
    """L1 reconstruction + weighted KL of a diagonal Gaussian posterior to N(0, I), per element."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return F.l1_loss(reconstruction, images) + kl_weight * kl


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(label) with the causal shift (logit t predicts token t+1).

    logits (batch, seq, vocab), labels (batch, seq) with IGNORE where unlabelled
    -> logprobs (batch, seq-1), mask (batch, seq-1).
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logp * mask, mask


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all labelled positions of the batch (HF's causal-LM loss)."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / mask.sum().clamp(min=1)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens, per sequence (batch,)."""
    return token_logprobs(logits, labels)[0].sum(dim=-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7) on sequence log-probs, averaged over the batch.

    The reference log-probs carry no gradient."""
    margin = (policy_chosen - reference_chosen.detach()) - (
        policy_rejected - reference_rejected.detach()
    )
    return -F.logsigmoid(beta * margin).mean()
