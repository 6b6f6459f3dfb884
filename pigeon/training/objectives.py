"""The training stages' losses (the stage table, with what each stage trains: `pigeon.training.stages`).

vae      L1 reconstruction + KL + perceptual
image    diffusion on images conditioned on their own tokens + VQ + token budget (+ latent
         reconstruction from the condition)
decoder  diffusion on the target conditioned on its own tokens (or a history image's) + the
         reference's latents (+ style classification of the pooled embedding)
lmm      next-token loss on [text, <img>, codes, </img>]
sft      masked preference reconstruction (L_MPR)
dpo      sigmoid DPO, beta 0.1, policy and reference on the same sampled context
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pigeon.core.masking import mask_sequence, pad_right
from pigeon.core.prompt import PromptBatch, PromptBuilder, left_pad
from pigeon.models.mask_generator import random_reference_keep, select_keep
from pigeon.models.pigeon import PigeonModel, encoder_input
from pigeon.models.unet import ConditionSketch, unet_forward
from pigeon.training import losses
from pigeon.training.frozen import FrozenEncodings, frozen_tokens


@dataclass
class PersonalizationBatch:
    """Stage 1/2 inputs: history images (batch, N, 3, S, S) and the target (batch, 3, S, S) in [0, 1]."""

    history: torch.Tensor
    target: torch.Tensor
    texts: list[str]
    # None: the reference is the (masked) target itself, as the official code trains; otherwise
    # another image of the target concept (batch, 3, S, S)
    reference: torch.Tensor | None = None


def time_ids_for(model: PigeonModel, batch: int, device: torch.device) -> torch.Tensor:
    s = float(model.config.image_size)
    return torch.tensor([s, s, 0, 0, s, s], device=device).expand(batch, 6)


# ------------------------------------------------------------------------------------------------
# Stage 0a and 0b


def vae_objective(
    model: PigeonModel,
    images: torch.Tensor,
    kl_weight: float = 1e-6,
    perceptual: nn.Module | None = None,
    perceptual_weight: float = 0.0,
    decoder_only: bool = False,
) -> torch.Tensor:
    """L1 + KL (+ perceptual_weight * a perceptual distance, `pigeon.training.perceptual`).
    images in [0, 1] (batch, 3, H, W).

    decoder_only: the encoder is frozen, so the latents every later stage learned on stay as they
    are; the decoder learns to draw the image from its posterior mean, the latents serving decodes
    (L1 + perceptual, no KL: nothing trains the posterior)."""
    x = images * 2 - 1
    if decoder_only:
        with torch.no_grad():
            latents = model.vae.encode(x).latent_dist.mean
        reconstruction = model.vae.decode(latents).sample
        loss = F.l1_loss(reconstruction.float(), x)
    else:
        posterior = model.vae.encode(x).latent_dist
        reconstruction = model.vae.decode(posterior.sample()).sample
        loss = losses.vae_loss(
            reconstruction.float(), x, posterior.mean, posterior.logvar, kl_weight
        )
    if perceptual is not None and perceptual_weight > 0:
        loss = loss + perceptual_weight * perceptual(reconstruction.float(), x)
    return loss


def image_objective(
    model: PigeonModel,
    images: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    uncond_prob: float = 0.1,
    keep_target: float = 0.6,
    budget_weight: float = 1.0,
    probe: ConditionSketch | None = None,
    reconstruct_weight: float = 0.0,
    style_head: nn.Module | None = None,
    style_weight: float = 0.0,
    styles: torch.Tensor | None = None,
    snr_gamma: float = 0.0,
    frozen: FrozenEncodings | None = None,
) -> torch.Tensor:
    """LaVIT's tokenizer + diffusion decoder: denoise the image's latents conditioned on its own tokens.

    The token budget (`keep_budget`) acts on the keep decision serving makes: a budget on the mean
    p(keep) alone is met by every patch at p = 0.6, which serving then keeps in full (the collapsed
    small run kept every patch). In training mode the codebook's dead codes are restarted on the
    previous step's encoder outputs (after its backward, before this step uses the codebook).

    The reconstruction term regresses the image's latents from the condition, as LaVIT trains its
    tokenizer to reconstruct features from the kept tokens: trained through the UNet's loss alone, an
    earlier small run's tokens carried nothing (the UNet's loss was the same with the condition
    zeroed). The regressor is the UNet's own condition sketch, or `probe` (a training-only
    `ConditionSketch` kept in the trainer state) for a UNet without one.

    The style term (`style_weight` > 0, data with style labels): as in `decoder_objective`,
    `style_head` classifies the image's style (`styles`, (batch,) indices) from the pooled
    embedding; here the gradient reaches the tokenizer through the quantizer's straight-through
    estimate, so the kept codes themselves, which the LMM learns to generate, carry the style.

    alphas_cumprod: (T,) from `pigeon.diffusion.scheduler.alphas_cumprod`.
    """
    encoder = model.history_encoder
    quantizer = encoder.quantizer
    if encoder.training and hasattr(quantizer, "observed"):  # the previous step's codes
        quantizer.restart_dead_codes(*quantizer.observed)  # before this step's graph uses them
    tok = encoder.tokenize(encoder_input(model, images))
    if encoder.training:
        quantizer.observed = (tok.token_ids, tok.encoded.detach(), tok.token_keep.detach())
    prompt_embeds, pooled, _ = model.condition_adapter(tok.quantized, tok.token_keep)
    latents = (frozen or FrozenEncodings()).latents(model, images)  # the VAE is frozen here
    reconstruction = torch.zeros((), device=images.device)
    if model.config.unet.condition_sketch:  # the model's own sketch is the probe
        probe = model.unet.condition_sketch
    if probe is not None and reconstruct_weight > 0:
        reconstruction = F.mse_loss(probe(prompt_embeds), latents)
    diffusion = sampled_denoising_loss(
        model, latents, alphas_cumprod, prompt_embeds, pooled, uncond_prob, snr_gamma=snr_gamma
    )
    budget = keep_budget(tok.keep_prob, keep_target)
    loss = (
        diffusion + tok.commit_loss + budget_weight * budget + reconstruct_weight * reconstruction
    )
    if style_weight > 0:
        loss = loss + style_weight * style_loss(style_head, pooled, styles)
    return loss


def denoising_loss(
    model: PigeonModel,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    reference_latents: torch.Tensor | None = None,
    snr_gamma: float = 0.0,
) -> torch.Tensor:
    """L_diff of the UNet on latents noised to timesteps t (batch,), given its condition (and the
    reference's latents as input channels when `unet.reference_input` is on); Min-SNR-gamma
    weighted when snr_gamma > 0."""
    b = latents.shape[0]
    a_t = alphas_cumprod.to(latents)[t].view(b, 1, 1, 1)
    noisy = a_t.sqrt() * latents + (1 - a_t).sqrt() * noise
    pred = unet_forward(
        model.unet,
        model.config,
        noisy,
        t,
        prompt_embeds,
        pooled,
        time_ids_for(model, b, latents.device),
        reference_latents,
    )
    prediction_type = model.config.scheduler.prediction_type
    if prediction_type == "v_prediction":
        target = a_t.sqrt() * noise - (1 - a_t).sqrt() * latents
    else:
        target = noise
    weights = None
    if snr_gamma > 0:
        a = a_t.flatten()
        weights = losses.min_snr_weights(a / (1 - a), snr_gamma, prediction_type)
    return losses.diffusion_loss(pred, target, weights)


def sampled_denoising_loss(
    model: PigeonModel,
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    uncond_prob: float,
    reference_latents: torch.Tensor | None = None,
    snr_gamma: float = 0.0,
    max_timestep_fraction: float = 1.0,
    reference_start_share: float = 0.0,
    reference_start_strength: float = 0.8,
) -> torch.Tensor:
    """`denoising_loss` at random noise and timesteps, the condition zeroed for a share uncond_prob
    of the batch (CFG's negatives; a reference input stays). Timesteps are drawn from the first
    `max_timestep_fraction` of the schedule (an image-to-image start at strength s only ever asks
    the UNet about timesteps below s T).

    For a share `reference_start_share` of the batch the noisy latents lie on serving's
    image-to-image path instead (`reference_start_noise`), started from the reference at a strength
    below `reference_start_strength`."""
    b = latents.shape[0]
    drop = (torch.rand(b, device=latents.device) < uncond_prob).to(prompt_embeds.dtype)
    prompt_embeds = prompt_embeds * (1 - drop)[:, None, None]  # CFG: zero negatives
    pooled = pooled * (1 - drop)[:, None]
    noise = torch.randn_like(latents)
    top = max(1, math.ceil(max_timestep_fraction * len(alphas_cumprod)))
    t = torch.randint(0, top, (b,), device=latents.device)
    if reference_start_share > 0:
        if reference_latents is None:
            raise ValueError("train.reference_start_share needs data with a paired reference")
        noise, t = reference_start_noise(
            noise,
            t,
            latents,
            reference_latents,
            alphas_cumprod,
            reference_start_share,
            min(top, math.ceil(reference_start_strength * len(alphas_cumprod))),
        )
    return denoising_loss(
        model,
        latents,
        noise,
        t,
        alphas_cumprod,
        prompt_embeds,
        pooled,
        reference_latents,
        snr_gamma,
    )


def reference_start_noise(
    noise: torch.Tensor,
    t: torch.Tensor,
    latents: torch.Tensor,
    reference_latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    share: float,
    start_top: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps that put a share of the batch on serving's image-to-image path.

    Serving starts at x_s = sqrt(a_s) ref + sqrt(1 - a_s) eps, the reference noised to its start
    s = strength T, and the UNet is trained to denoise toward the target, not the reference. If it
    predicts the target x0 at every step, DDIM stays on the family
        x_t = sqrt(a_t) x0 + sqrt(1 - a_t) (eps + sqrt(SNR_s) (ref - x0)),   t <= s,
    (the reference's offset shrinks with the noise). So for those samples the noise is
    eps + sqrt(SNR_s) (ref - x0), with t < start_top and s uniform in [t, start_top): the epsilon
    (or v) target built from it has the UNet take the style from its condition rather than from the
    reference's noised latents, which at training time otherwise always show the target's own
    style. -> (noise, t) for `denoising_loss`."""
    b = latents.shape[0]
    chosen = torch.rand(b, device=latents.device) < share
    t = torch.where(chosen, torch.randint(0, start_top, (b,), device=latents.device), t)
    # the start: in [t, start_top) for the chosen samples (elsewhere unused: their offset is 0)
    s = t + (torch.rand(b, device=latents.device) * (start_top - t)).long()
    a_s = alphas_cumprod.to(latents)[s]
    offset = (a_s / (1 - a_s)).sqrt() * chosen.to(latents.dtype)  # sqrt(SNR_s), 0 elsewhere
    return noise + offset.view(b, 1, 1, 1) * (reference_latents - latents), t


def keep_budget(keep_prob: torch.Tensor, target: float) -> torch.Tensor:
    """(share of patches serving keeps - target)^2, where serving keeps p(keep) > 0.5; the gradient
    reaches p(keep) straight through. keep_prob (batch, P)."""
    kept = (keep_prob > 0.5).to(keep_prob.dtype) - keep_prob.detach() + keep_prob
    return (kept.mean() - target) ** 2


# ------------------------------------------------------------------------------------------------
# Stage 0b, second half (`decoder`): the detokenizer with a spatial reference


def serving_condition(
    model: PigeonModel, images: torch.Tensor, frozen: FrozenEncodings | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition serving builds from these images' tokens: the history encoder in eval mode
    (deterministic keep), its kept codes' unit vectors through the condition adapter, as
    `ConditionAdapterForExport` runs them. -> prompt_embeds, pooled_embeds (with a graph to the
    condition adapter's parameters where they train). `frozen` remembers the tokens per image."""
    ids, keep = frozen_tokens(model, images) if frozen is None else frozen.tokens(model, images)
    code_vectors = model.history_encoder.quantizer.code_vectors(ids)
    prompt_embeds, pooled, _ = model.condition_adapter(code_vectors, keep)
    return prompt_embeds, pooled


def decoder_objective(
    model: PigeonModel,
    targets: torch.Tensor,
    references: torch.Tensor | None,
    alphas_cumprod: torch.Tensor,
    uncond_prob: float = 0.1,
    history: torch.Tensor | None = None,
    history_token_share: float = 0.0,
    style_head: nn.Module | None = None,
    style_weight: float = 0.0,
    target_styles: torch.Tensor | None = None,
    history_styles: torch.Tensor | None = None,
    snr_gamma: float = 0.0,
    max_timestep_fraction: float = 1.0,
    reference_start_share: float = 0.0,
    reference_start_strength: float = 0.8,
    frozen: FrozenEncodings | None = None,
) -> torch.Tensor:
    """LaVIT's detokenizer on a frozen tokenizer, with the reference as a spatial input: denoise the
    target's latents given tokens (cross-attention) and the reference's latents (input channels,
    `unet.reference_input`). The reference shows the target's concept in another style, so what the
    tokens add is the style, which is what the personalizer generates.

    The tokens are the target's own, or for a share `history_token_share` of the batch those of a
    history image of the same user (its style, another concept): a condition that carries the style
    and not the concept, as the personalizer's generated tokens do at serving, so the UNet learns to
    take the concept from the reference.

    The style term (`style_weight` > 0, data with style labels): `style_head` classifies the style
    of the image whose tokens made the condition from its pooled embedding, which enters every
    ResNet block of the UNet through the time embedding. The condition adapter trains with it, so
    the pooled embedding becomes a style code that the UNet can read globally (cross-attention alone
    learns the style slowly at this scale: the loss with the condition zeroed stays within 0.0003 of
    the loss with it).

    targets, references, history in [0, 1] (batch, 3, S, S); target_styles, history_styles (batch,)
    style indices. CFG drops the tokens only: serving keeps the reference in both branches. Data
    without a reference apart from the target train this stage without one (references None,
    `unet.reference_input` off): the tokens alone, at serving's deterministic keep."""
    token_images, token_styles = targets, target_styles
    if history is not None and history_token_share > 0:
        swap = torch.rand(len(targets), device=targets.device) < history_token_share
        token_images = torch.where(swap[:, None, None, None], history, targets)
        if target_styles is not None and history_styles is not None:
            token_styles = torch.where(swap, history_styles, target_styles)
    # the tokenizer and the VAE are frozen; the condition adapter trains only with the style term
    frozen = frozen or FrozenEncodings()
    prompt_embeds, pooled = serving_condition(model, token_images, frozen)
    latents = frozen.latents(model, targets)
    reference_latents = None if references is None else frozen.latents(model, references)
    loss = sampled_denoising_loss(
        model,
        latents,
        alphas_cumprod,
        prompt_embeds,
        pooled,
        uncond_prob,
        reference_latents,
        snr_gamma,
        max_timestep_fraction,
        reference_start_share,
        reference_start_strength,
    )
    if style_weight > 0:
        loss = loss + style_weight * style_loss(style_head, pooled, token_styles)
    return loss


def style_loss(
    style_head: nn.Module | None, pooled: torch.Tensor, styles: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of the style head on the pooled embedding (batch, pooled_dim) against the
    style labels (batch,) of the images whose tokens made it."""
    if style_head is None or styles is None:
        raise ValueError("the style term needs a style head and the tokens' style labels")
    return F.cross_entropy(style_head(pooled), styles)


# ------------------------------------------------------------------------------------------------
# Stage 0c


def lmm_objective(
    model: PigeonModel, builder: PromptBuilder, images: torch.Tensor, texts: list[str]
) -> torch.Tensor:
    """Next-token loss of the base text-to-image LMM on [text, <img>, codes, </img>]."""
    with torch.no_grad():
        ids, keep = model.history_encoder(encoder_input(model, images))
    codes = [ids[i][keep[i] > 0].cpu().numpy() for i in range(len(ids))]
    batch = left_pad(
        [builder.build_text_to_image(t, c) for t, c in zip(texts, codes, strict=False)]
    )
    t = _to_torch(batch, images.device)
    b = images.shape[0]
    ref = torch.zeros(b, model.config.condition_adapter.context_dim, device=images.device)
    logits, _ = model.personalizer(
        t["input_ids"], t["embed_keep"], ref, t["attention_mask"], t["position_ids"]
    )
    return losses.lm_loss(logits, t["labels"])


def _to_torch(batch: PromptBatch, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(getattr(batch, k)).to(device)
        for k in (
            "input_ids",
            "embed_keep",
            "attention_mask",
            "position_ids",
            "labels",
            "keep_source",
        )
    }


# ------------------------------------------------------------------------------------------------
# Stages 1 and 2


@dataclass
class PersonalizationContext:
    """One sampled context (tokenization, masks, reference embedding) shared by every forward that
    must see the same randomness (DPO's policy and reference)."""

    prompt: dict[str, torch.Tensor]  # left-padded prompt without target, keep from the masks
    reference_embedding: torch.Tensor  # (batch, context_dim)
    target_codes: list[np.ndarray]


def sample_context(
    model: PigeonModel,
    builder: PromptBuilder,
    batch: PersonalizationBatch,
    reference_ratio: float | None = None,
    generator: random.Random | None = None,
) -> tuple[PersonalizationContext, torch.Tensor]:
    """Tokenize, score, mask (r ~ U(0, 1) once per batch) and assemble; returns the context and the
    history keep decisions (straight-through when the mask generator trains)."""
    mg_config = model.config.mask_generator
    b, n = batch.history.shape[:2]
    device = batch.target.device
    parts = [batch.history.flatten(0, 1), batch.target]
    if batch.reference is not None:
        parts.append(batch.reference)
    images = torch.cat(parts)  # (b*n + b [+ b], 3, S, S)
    with torch.no_grad():
        ids, keep = model.history_encoder(encoder_input(model, images))
    kept = [ids[i][keep[i] > 0].cpu().numpy() for i in range(len(ids))]
    hist = [kept[i * n : (i + 1) * n] for i in range(b)]
    targets = kept[b * n : b * n + b]
    references = kept[b * n + b :] if batch.reference is not None else targets
    r = (generator or random).uniform(0.0, 1.0) if reference_ratio is None else reference_ratio
    seqs = [mask_sequence(h, ref) for h, ref in zip(hist, references, strict=True)]
    tok, pos, types = (
        torch.from_numpy(pad_right([s[j] for s in seqs])).to(device) for j in range(3)
    )
    embeds = model.personalizer.input_embeddings()(tok + model.vocab.visual_offset)
    if mg_config.mask_type == "mutual":
        scores = model.mask_generator(embeds.detach(), pos, types)
        gumbel = -torch.log(-torch.log(torch.rand_like(scores).clamp(1e-20, 1.0)))
        keep_all = select_keep(
            scores,
            types,
            history_ratio=mg_config.history_mask_ratio,
            reference_ratio=r,
            training=True,
            gumbel=gumbel,
            straight_through=mg_config.training == "straight_through",
        )
    elif mg_config.mask_type == "random":
        keep_all = random_reference_keep(
            types, r, torch.Generator().manual_seed((generator or random).randrange(2**31))
        )
    else:
        keep_all = (types > 0).float()
    # the masked reference through the (frozen) condition adapter, mean-pooled
    p = model.config.history_encoder.num_patches
    ref_ids = torch.zeros(b, p, dtype=torch.long, device=device)
    ref_keep = torch.zeros(b, p, dtype=torch.long, device=device)
    hist_keep = []
    for i in range(b):
        n_hist = sum(len(h) for h in hist[i])
        n_ref = len(references[i])
        ref_ids[i, :n_ref] = torch.from_numpy(references[i])
        ref_keep[i, :n_ref] = (keep_all[i, n_hist : n_hist + n_ref] > 0.5).long()
        hist_keep.append(keep_all[i, :n_hist])
    code_vectors = model.history_encoder.quantizer.code_vectors(ref_ids)
    reference_embedding = model.condition_adapter(code_vectors, ref_keep)[2]
    prompts = [
        builder.build(text, h, [k.detach().cpu().numpy() for k in _split(hk, h)])
        for text, h, hk in zip(batch.texts, hist, hist_keep, strict=False)
    ]
    prompt = _to_torch(left_pad(prompts), device)
    # place the (straight-through) history keep values where the prompt holds history tokens
    src = prompt["keep_source"]
    flat_keep = pad_right_torch(hist_keep)
    gathered = torch.gather(flat_keep, 1, src.clamp(min=0))
    prompt["embed_keep"] = torch.where(src >= 0, gathered, prompt["embed_keep"])
    return PersonalizationContext(prompt, reference_embedding, targets), keep_all


def _split(keep: torch.Tensor, runs: list[np.ndarray]) -> list[torch.Tensor]:
    return list(torch.split(keep, [len(r) for r in runs]))


def pad_right_torch(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.stack([F.pad(r, (0, width - len(r)), value=1.0) for r in rows])


def with_target(
    model: PigeonModel, context: PersonalizationContext, target_codes: list[np.ndarray]
) -> dict[str, torch.Tensor]:
    """Append [v_1..v_n, </img>] after <img> to each (left-padded) prompt; labels on that run only."""
    vocab = model.vocab
    prompt = context.prompt
    device = prompt["input_ids"].device
    runs = [
        torch.from_numpy(np.append(c + vocab.visual_offset, vocab.img_end)).to(device)
        for c in target_codes
    ]
    width = max(len(r) for r in runs)
    b = len(runs)
    tail_ids = torch.zeros(b, width, dtype=torch.long, device=device)
    tail_mask = torch.zeros(b, width, dtype=torch.long, device=device)
    tail_labels = torch.full((b, width), losses.IGNORE, dtype=torch.long, device=device)
    for i, r in enumerate(runs):  # right-pad the target runs (the prompt is left-padded)
        tail_ids[i, : len(r)] = r
        tail_mask[i, : len(r)] = 1
        tail_labels[i, : len(r)] = r
    input_ids = torch.cat([prompt["input_ids"], tail_ids], dim=1)
    attention_mask = torch.cat([prompt["attention_mask"], tail_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "embed_keep": torch.cat(
            [prompt["embed_keep"], tail_mask.to(prompt["embed_keep"].dtype)], 1
        ),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": torch.cat([prompt["labels"], tail_labels], dim=1),
    }


def personalizer_logits(
    model: PigeonModel,
    context: PersonalizationContext,
    inputs: dict[str, torch.Tensor],
    personalizer=None,
) -> torch.Tensor:
    personalizer = personalizer or model.personalizer
    logits, _ = personalizer(
        inputs["input_ids"],
        inputs["embed_keep"],
        context.reference_embedding,
        inputs["attention_mask"],
        inputs["position_ids"],
    )
    return logits


def sft_objective(
    model: PigeonModel,
    builder: PromptBuilder,
    batch: PersonalizationBatch,
    generator: random.Random | None = None,
) -> torch.Tensor:
    """L_MPR: reconstruct the unmasked target's tokens from masked history + masked reference."""
    context, _ = sample_context(model, builder, batch, generator=generator)
    inputs = with_target(model, context, context.target_codes)
    return losses.lm_loss(personalizer_logits(model, context, inputs), inputs["labels"])


def dpo_objective(
    model: PigeonModel,
    reference_personalizer: torch.nn.Module,
    builder: PromptBuilder,
    batch: PersonalizationBatch,
    chosen: list[np.ndarray],
    rejected: list[np.ndarray],
    beta: float = 0.1,
    generator: random.Random | None = None,
) -> torch.Tensor:
    """Sigmoid DPO with policy and reference evaluated on the same sampled context."""
    with torch.no_grad():
        context, _ = sample_context(model, builder, batch, generator=generator)
    logps = {}
    for name, codes in (("chosen", chosen), ("rejected", rejected)):
        inputs = with_target(model, context, codes)
        logps[f"policy_{name}"] = losses.sequence_logprob(
            personalizer_logits(model, context, inputs), inputs["labels"]
        )
        with torch.no_grad():
            logps[f"reference_{name}"] = losses.sequence_logprob(
                personalizer_logits(model, context, inputs, reference_personalizer),
                inputs["labels"],
            )
    return losses.dpo_loss(
        logps["policy_chosen"],
        logps["policy_rejected"],
        logps["reference_chosen"],
        logps["reference_rejected"],
        beta,
    )
