"""Losses against references, and which parameters each stage may change."""

import copy
import dataclasses
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pigeon.config import MaskGeneratorConfig, preset
from pigeon.core.prompt import IGNORE, PromptBuilder
from pigeon.diffusion.scheduler import alphas_cumprod
from pigeon.models.unet import ConditionSketch
from pigeon.training import losses
from pigeon.training import objectives as O
from pigeon.training.frozen import FrozenEncodings, frozen_tokens, image_latents
from pigeon.training.stages import STAGE_NAMES, set_trainable, stage_parameters

from .conftest import make_model


def test_lm_loss_matches_cross_entropy_on_labelled_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.full((2, 6), IGNORE)
    labels[0, 3:] = torch.tensor([1, 2, 3])
    labels[1, 5] = 7
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    torch.testing.assert_close(losses.lm_loss(logits, labels), expected)


def test_sequence_logprob_sums_the_labelled_tokens():
    logits = torch.zeros(1, 4, 5)  # uniform: log p = -log 5 per token
    labels = torch.tensor([[IGNORE, IGNORE, 2, 3]])
    torch.testing.assert_close(
        losses.sequence_logprob(logits, labels), torch.tensor([-2 * math.log(5)])
    )


def test_dpo_loss_invariants():
    lp = torch.tensor([-3.0, -5.0])
    # policy == reference: log 2
    torch.testing.assert_close(losses.dpo_loss(lp, lp, lp, lp), torch.tensor(math.log(2)))
    # gradient raises the chosen and lowers the rejected log-prob
    chosen = torch.tensor([-3.0], requires_grad=True)
    rejected = torch.tensor([-4.0], requires_grad=True)
    losses.dpo_loss(chosen, rejected, torch.tensor([-3.0]), torch.tensor([-4.0])).backward()
    assert chosen.grad < 0 < rejected.grad
    # beta scales the margin: -log sigmoid(beta * margin)
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -6.0, -2.0, -3.0))
    for beta in (0.1, 0.5):
        torch.testing.assert_close(
            losses.dpo_loss(pc, pr, rc, rr, beta), -F.logsigmoid(torch.tensor(beta * 4.0))
        )


def test_vae_loss_is_zero_for_perfect_reconstruction_and_standard_posterior():
    x = torch.rand(2, 3, 4, 4)
    zeros = torch.zeros(2, 4, 2, 2)
    assert losses.vae_loss(x, x, zeros, zeros, 1.0) == 0


@pytest.fixture(scope="module")
def setup():
    config = preset("tiny")
    from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

    tokenizer = TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, 320), 320)
    return config, tokenizer


def run_stage(model, tokenizer, stage):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)
    builder = PromptBuilder(tokenizer, model.vocab)
    batch = O.PersonalizationBatch(torch.rand(2, 3, 3, 32, 32, generator=g), images, ["a", "b"])
    if stage == "vae":
        return O.vae_objective(model, images)
    if stage == "image":
        return O.image_objective(
            model, images, torch.from_numpy(alphas_cumprod(model.config.scheduler)).float()
        )
    if stage == "decoder":
        references = torch.rand(2, 3, 32, 32, generator=g)
        ac = torch.from_numpy(alphas_cumprod(model.config.scheduler)).float()
        return O.decoder_objective(model, images, references, ac)
    if stage == "lmm":
        return O.lmm_objective(model, builder, images, ["a cat", "a dog"])
    if stage == "sft":
        return O.sft_objective(model, builder, batch, random.Random(0))
    reference = copy.deepcopy(model.personalizer).eval()
    return O.dpo_objective(
        model,
        reference,
        builder,
        batch,
        [np.array([1, 2, 3]), np.array([4])],
        [np.array([7, 8]), np.array([9, 9, 9])],
    )


def test_frozen_encodings_are_the_encoders_outputs_computed_once_per_image(setup):
    """The cache against the encoders themselves: each image's latents and tokens as the image
    encoded alone gives them, and as the whole batch gives them to float precision; an image drawn
    again (here in another batch order) is looked up, not encoded; past the memory budget the
    answers stay right and nothing is kept; the tokenizer's training mode is left as it was."""
    config, _ = setup
    model = make_model(config).train()
    g = torch.Generator().manual_seed(5)
    unique = torch.rand(3, 3, 32, 32, generator=g)
    images = torch.cat([unique, unique[:1]])  # the first image twice
    cache = FrozenEncodings(budget_mib=16)
    latents = cache.latents(model, images)
    ids, keep = cache.tokens(model, images)
    assert cache.encoded == 2 * 3  # three distinct images, latents and tokens
    assert model.history_encoder.training
    with torch.no_grad():
        torch.testing.assert_close(latents, image_latents(model, images), atol=1e-5, rtol=1e-5)
        for i in range(len(images)):
            assert torch.equal(latents[i : i + 1], image_latents(model, images[i : i + 1]))
    batch_ids, batch_keep = frozen_tokens(model, images)
    assert torch.equal(ids, batch_ids) and torch.equal(keep, batch_keep)
    order = torch.tensor([2, 0, 1, 3])
    assert torch.equal(cache.latents(model, images[order]), latents[order])
    assert torch.equal(cache.tokens(model, images[order])[0], ids[order])
    assert cache.encoded == 6 and cache.summary()["images"] == 6
    full = FrozenEncodings(budget_mib=1e-6)  # one byte: every entry is over it
    assert torch.equal(full.latents(model, images), latents)
    assert torch.equal(full.latents(model, images), latents)
    assert full.encoded == 2 * 4 and full.summary()["images"] == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_weighs_each_sample_by_its_clipped_snr(setup, prediction_type):
    """denoising_loss under Min-SNR-gamma against the formula written out per sample: the UNet's
    squared error at each timestep times min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v), with
    SNR = a_t / (1 - a_t); gamma 0 is the plain mean squared error."""
    config, _ = setup
    config = dataclasses.replace(
        config,
        scheduler=dataclasses.replace(config.scheduler, prediction_type=prediction_type),
    )
    model = make_model(config).eval()
    g = torch.Generator().manual_seed(11)
    images = torch.rand(3, 3, 32, 32, generator=g)
    latents = image_latents(model, images)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([5, 300, 950])  # SNR far above, near and far below gamma
    ac = torch.from_numpy(alphas_cumprod(model.config.scheduler)).float()
    with torch.no_grad():
        embeds, pooled = O.serving_condition(model, images)
        gamma = 5.0
        got = O.denoising_loss(model, latents, noise, t, ac, embeds, pooled, snr_gamma=gamma)
        plain = O.denoising_loss(model, latents, noise, t, ac, embeds, pooled)
        expected = 0.0
        for i, step in enumerate(t.tolist()):
            a = float(ac[step])
            snr = a / (1 - a)
            one = O.denoising_loss(
                model,
                latents[i : i + 1],
                noise[i : i + 1],
                t[i : i + 1],
                ac,
                embeds[i : i + 1],
                pooled[i : i + 1],
            )
            denominator = snr + 1 if prediction_type == "v_prediction" else snr
            expected += float(one) * min(snr, gamma) / denominator / len(t)
    assert float(got) == pytest.approx(expected, rel=1e-4)
    assert float(got) != pytest.approx(float(plain), rel=1e-2)  # the weights do change the loss


def test_timesteps_stay_below_the_fraction_and_the_loss_is_built_from_them(setup):
    """sampled_denoising_loss with max_timestep_fraction 0.3 against denoising_loss rebuilt by hand
    from the same draws (condition drop, noise, then timesteps below ceil(0.3 T)); with a fraction
    of 1, the same seed draws timesteps above 0.3 T too, so the bound is what holds them down."""
    config, _ = setup
    model = make_model(config).eval()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ac = torch.from_numpy(alphas_cumprod(model.config.scheduler)).float()
    top = math.ceil(0.3 * len(ac))
    with torch.no_grad():
        latents = image_latents(model, images)
        embeds, pooled = O.serving_condition(model, images)
        torch.manual_seed(2)
        got = O.sampled_denoising_loss(
            model, latents, ac, embeds, pooled, 0.0, max_timestep_fraction=0.3
        )
        torch.manual_seed(2)
        torch.rand(8)  # the condition-drop draw
        noise = torch.randn_like(latents)
        t = torch.randint(0, top, (8,))
        expected = O.denoising_loss(model, latents, noise, t, ac, embeds, pooled)
        torch.manual_seed(2)
        torch.rand(8), torch.randn_like(latents)
        unbounded = torch.randint(0, len(ac), (8,))
    assert int(t.max()) < top <= int(unbounded.max())
    torch.testing.assert_close(got, expected)


def test_reference_start_is_the_path_ddim_takes_from_the_reference():
    """The family reference_start_noise trains on, against the repository's DDIM sampler: start at
    the reference noised to s (as serving does at strength < 1), let an ideal UNet predict the
    target at every step, and each x_t the sampler reaches is sqrt(a_t) x0 + sqrt(1 - a_t) (eps +
    sqrt(SNR_s) (ref - x0)); reference_start_noise builds exactly those noisy latents."""
    from pigeon.config import SchedulerConfig
    from pigeon.diffusion.scheduler import add_noise, make_sampler, start_index

    config = SchedulerConfig()
    sampler = make_sampler(config, 25, "ddim")
    rng = np.random.default_rng(0)
    x0, ref, eps = (rng.standard_normal((1, 4, 8, 8)) for _ in range(3))
    start = start_index(25, 0.6)
    s = int(sampler.timesteps[start])
    snr_s = sampler.a(s) / (1 - sampler.a(s))
    sample = add_noise(ref, eps, np.float32(sampler.a(s)))
    for i in range(start, len(sampler.timesteps) - 1):
        t = int(sampler.timesteps[i])
        family = add_noise(x0, eps + math.sqrt(snr_s) * (ref - x0), np.float32(sampler.a(t)))
        np.testing.assert_allclose(sample, family, atol=1e-5)
        ideal_eps = (sample - math.sqrt(sampler.a(t)) * x0) / math.sqrt(1 - sampler.a(t))
        sample = sampler.step(ideal_eps, i, sample)
    ac = torch.from_numpy(alphas_cumprod(config)).double()
    b, top = 64, 600
    latents, reference = torch.randn(b, 4, 8, 8).double(), torch.randn(b, 4, 8, 8).double()
    noise = torch.randn_like(latents)
    torch.manual_seed(3)
    got_noise, got_t = O.reference_start_noise(
        noise, torch.full((b,), 999), latents, reference, ac, 1.0, top
    )
    assert int(got_t.max()) < top
    offset = (got_noise - noise) / (reference - latents)  # sqrt(SNR_s) of each sample's start
    snr_s = offset.flatten(1).mean(1) ** 2
    snr = ac / (1 - ac)
    for i in range(b):  # each start is a timestep in [t, top): SNR_s between SNR_(top-1) and SNR_t
        assert (
            float(snr[top - 1]) * (1 - 1e-9) <= float(snr_s[i]) <= float(snr[got_t[i]]) * (1 + 1e-9)
        )
    torch.manual_seed(3)
    kept, kept_t = O.reference_start_noise(
        noise, torch.full((b,), 999), latents, reference, ac, 0.0, top
    )
    assert torch.equal(kept, noise) and bool((kept_t == 999).all())  # share 0: nothing moves


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_decoder_tokens_come_from_the_history_for_their_share(setup, share):
    """decoder_objective against the same loss built by hand from the images whose tokens it
    should read: the targets' at share 0, the history images' at share 1 (same noise, timesteps)."""
    config, _ = setup
    model = make_model(config).eval()
    model.enable_reference_input()
    g = torch.Generator().manual_seed(3)
    targets, history, references = (torch.rand(3, 3, 32, 32, generator=g) for _ in range(3))
    ac = torch.from_numpy(alphas_cumprod(model.config.scheduler)).float()
    torch.manual_seed(7)
    got = O.decoder_objective(
        model, targets, references, ac, history=history, history_token_share=share
    )
    torch.manual_seed(7)
    if share > 0:
        torch.rand(3)  # the objective's draw of which rows swap
    prompt_embeds, pooled = O.serving_condition(model, history if share == 1.0 else targets)
    expected = O.sampled_denoising_loss(
        model,
        image_latents(model, targets),
        ac,
        prompt_embeds,
        pooled,
        0.1,
        image_latents(model, references),
    )
    torch.testing.assert_close(got, expected)
    # and the other source's tokens give another loss: the test can tell them apart
    torch.manual_seed(7)
    other = O.decoder_objective(
        model, targets, references, ac, history=history, history_token_share=1.0 - share
    )
    assert not torch.allclose(other, expected)


def test_decoder_style_term_is_the_cross_entropy_of_the_token_images_styles(setup):
    """The style term against a hand-built cross-entropy of the style head on the pooled embedding
    of the images whose tokens made the condition (history styles where the rows swapped), and the
    gradient it sends into the condition adapter, which the stage then trains."""
    config, _ = setup
    model = make_model(config).eval()
    model.enable_reference_input()
    g = torch.Generator().manual_seed(5)
    targets, history, references = (torch.rand(4, 3, 32, 32, generator=g) for _ in range(3))
    target_styles, history_styles = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])
    head = torch.nn.Linear(config.condition_adapter.pooled_dim, 4)
    ac = torch.from_numpy(alphas_cumprod(model.config.scheduler)).float()

    def objective(weight: float) -> torch.Tensor:
        torch.manual_seed(11)
        return O.decoder_objective(
            model,
            targets,
            references,
            ac,
            history=history,
            history_token_share=0.5,
            style_head=head,
            style_weight=weight,
            target_styles=target_styles,
            history_styles=history_styles,
        )

    set_trainable(model, "decoder", decoder_condition=True)
    with_style, without = objective(2.0), objective(0.0)
    torch.manual_seed(11)
    swap = torch.rand(4) < 0.5
    assert 0 < int(swap.sum()) < 4  # the seed mixes both sources, so the labels must follow rows
    images = torch.where(swap[:, None, None, None], history, targets)
    _, pooled = O.serving_condition(model, images)
    labels = torch.where(swap, history_styles, target_styles)
    expected = torch.nn.functional.cross_entropy(head(pooled), labels)
    torch.testing.assert_close(with_style - without, 2.0 * expected)
    # the wrong rows' labels give another value: the test tells them apart
    wrong = torch.nn.functional.cross_entropy(head(pooled), target_styles)
    assert not torch.allclose(wrong, expected)
    with_style.backward()
    assert all(p.grad is not None for p in model.condition_adapter.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.history_encoder.parameters())  # tokens stay


def test_style_labels_follow_the_images_of_each_source():
    """Each user's style labels name the style its images are drawn in: procedural images
    re-rendered from the labels equal the user's images."""
    from pigeon.data import procedural
    from pigeon.training.data import ProceduralData

    data = ProceduralData(32)
    for u in data.users(np.random.default_rng(0), 6, 5, 0.4):
        concept = u.text.removeprefix("a ")
        assert np.array_equal(data.cache[(concept, data.style_names[u.target_style])], u.target)
        assert len(u.history_styles) == 5
        for image, style in zip(u.history, u.history_styles, strict=True):
            matches = [
                c
                for c in procedural.CONCEPTS
                if np.array_equal(data.cache[(c, data.style_names[style])], image)
            ]
            assert matches, "a history image is not drawn in its labelled style"


def test_image_style_term_is_the_cross_entropy_of_the_images_styles_and_reaches_the_tokenizer(
    setup,
):
    """The image stage's style term against a hand-built cross-entropy of the style head on the
    pooled embedding of the images' own tokens (a second pass through the tokenizer and the adapter
    with the same weights), and its gradient reaches the tokenizer, which the decoder's does not."""
    config, _ = setup
    model = make_model(config).eval()  # eval: no dead-code restarts, deterministic keep
    g = torch.Generator().manual_seed(3)
    images = torch.rand(4, 3, 32, 32, generator=g)
    styles = torch.tensor([2, 0, 3, 1])
    head = torch.nn.Linear(config.condition_adapter.pooled_dim, 4)
    ac = torch.from_numpy(alphas_cumprod(model.config.scheduler)).float()

    def objective(weight: float) -> torch.Tensor:
        torch.manual_seed(7)
        return O.image_objective(
            model, images, ac, style_head=head, style_weight=weight, styles=styles
        )

    set_trainable(model, "image")
    with_style, without = objective(1.5), objective(0.0)
    tok = model.history_encoder.tokenize(O.encoder_input(model, images))
    _, pooled, _ = model.condition_adapter(tok.quantized, tok.token_keep)
    expected = F.cross_entropy(head(pooled), styles)
    torch.testing.assert_close(with_style - without, 1.5 * expected)
    assert not torch.allclose(F.cross_entropy(head(pooled), styles.flip(0)), expected)
    model.zero_grad()
    (with_style - without).backward()  # the style term's gradient alone
    grads = [p.grad for p in model.history_encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="style labels"):
        O.image_objective(model, images, ac, style_head=head, style_weight=1.0, styles=None)


def test_labelled_images_are_the_same_draw_as_images_with_their_styles():
    """`labelled_images` draws what `images` draws from the same generator, and each label names
    the style the image is drawn in (procedural images re-rendered from the labels)."""
    from pigeon.training.data import ProceduralData

    data = ProceduralData(32)
    images, captions = data.images(np.random.default_rng(4), 12)
    same, same_captions, styles = data.labelled_images(np.random.default_rng(4), 12)
    assert np.array_equal(images, same) and captions == same_captions
    for image, caption, style in zip(same, same_captions, styles, strict=True):
        concept = caption.removeprefix("a ")
        assert np.array_equal(data.cache[(concept, data.style_names[style])], image)
    assert len(set(styles.tolist())) > 1


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_a_stage_changes_exactly_its_own_parameters(setup, stage):
    config, tokenizer = setup
    model = make_model(config).train()
    if (
        stage == "dpo"
    ):  # DPO starts from a stage-1 LoRA: make B non-zero so both A and B get gradients
        with torch.no_grad():
            for p in model.personalizer.lora_parameters():
                p.normal_(0, 0.1)
    if stage == "decoder":
        model.enable_reference_input()  # as train_stage does
    trainable = set_trainable(model, stage)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = run_stage(model, tokenizer, stage)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if name not in trainable:
            assert p.grad is None, f"{stage}: frozen {name} got a gradient"
    with_grad = {n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0}
    groups = {n.split(".")[0] + ("/lora" if "lora_" in n else "") for n in trainable}
    reached = {n.split(".")[0] + ("/lora" if "lora_" in n else "") for n in with_grad}
    assert reached == groups, f"{stage}: no gradient reached {groups - reached}"
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    for name, p in model.named_parameters():
        if name not in trainable:
            assert torch.equal(p, before[name]), f"{stage}: frozen {name} changed"


def test_vae_decoder_only_trains_the_decoder_on_the_frozen_latents(setup):
    """vae_decoder_only: the loss is the L1 of decoding the frozen encoder's posterior mean (known
    answer built by hand), the gradient reaches exactly the decoder's parameters, and after a step
    every image still encodes to the same latents (the later stages' latent space holds)."""
    from pigeon.training.stages import VAE_DECODER

    config, _ = setup
    model = make_model(config).train()
    trainable = set_trainable(model, "vae", vae_decoder_only=True)
    assert trainable and all(n.startswith(VAE_DECODER) for n in trainable)
    assert any(n.startswith("vae.decoder.") for n in trainable)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    x = images * 2 - 1
    with torch.no_grad():
        latents = model.vae.encode(x).latent_dist.mean
        decoded = model.vae.decode(latents).sample
        expected = F.l1_loss(decoded, x)
    loss = O.vae_objective(model, images, decoder_only=True)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(trainable)
    torch.optim.SGD(trainable.values(), lr=0.5).step()
    with torch.no_grad():
        assert torch.equal(model.vae.encode(x).latent_dist.mean, latents)
        assert not torch.allclose(model.vae.decode(latents).sample, decoded)  # the decoder moved
    with pytest.raises(ValueError, match="vae_decoder_only applies to the vae stage"):
        set_trainable(model, "image", vae_decoder_only=True)


def test_stage_parameter_groups(setup):
    config, _ = setup
    model = make_model(config)
    names = lambda stage: set(stage_parameters(model, stage))  # noqa: E731
    assert all("lora_" in n for n in names("dpo")) and names("dpo")
    assert names("dpo") < names("sft")
    assert any(n.startswith("mask_generator.") for n in names("sft"))
    assert not any("lora_" in n for n in names("lmm"))
    assert not names("vae") & names("image")
    with pytest.raises(ValueError, match="unknown stage 'rl'"):
        stage_parameters(model, "rl")
    # sft_base: the sft set and the LLM's base weights (the lmm set), nothing else
    assert set(stage_parameters(model, "sft", sft_base=True)) == names("sft") | names("lmm")
    with pytest.raises(ValueError, match="sft_base applies to the sft stage"):
        stage_parameters(model, "dpo", sft_base=True)
    with pytest.raises(ValueError, match="sft_base applies to the sft stage"):
        stage_parameters(model, "sft", lora_only=True, sft_base=True)
    # decoder_condition (train.style_weight): the UNet and the condition adapter, not the tokenizer
    with_condition = set(stage_parameters(model, "decoder", decoder_condition=True))
    adapter = {n for n in dict(model.named_parameters()) if n.startswith("condition_adapter.")}
    assert with_condition == names("decoder") | adapter and adapter
    with pytest.raises(ValueError, match="decoder_condition applies to the decoder stage"):
        stage_parameters(model, "image", decoder_condition=True)


def test_frozen_mask_generator_gets_no_gradient_as_in_the_official_code(setup):
    config, tokenizer = setup
    import dataclasses

    frozen = dataclasses.replace(config, mask_generator=MaskGeneratorConfig(training="frozen"))
    model = make_model(frozen).train()
    trainable = set_trainable(model, "sft")
    assert not any(n.startswith("mask_generator.") for n in trainable)
    run_stage(model, tokenizer, "sft").backward()
    assert all(p.grad is None for p in model.mask_generator.parameters())


def test_sft_labels_cover_only_the_target_run_and_end(setup):
    config, tokenizer = setup
    model = make_model(config)
    builder = PromptBuilder(tokenizer, model.vocab)
    g = torch.Generator().manual_seed(0)
    batch = O.PersonalizationBatch(
        torch.rand(2, 2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g), ["a", "bb"]
    )
    context, keep = O.sample_context(model, builder, batch, reference_ratio=0.5)
    inputs = O.with_target(model, context, context.target_codes)
    v = model.vocab
    for row, codes in enumerate(context.target_codes):
        labelled = inputs["labels"][row][inputs["labels"][row] != IGNORE].tolist()
        assert labelled == [c + v.visual_offset for c in codes.tolist()] + [v.img_end]
        start = inputs["input_ids"][row].tolist().index(v.img_start)
        assert inputs["labels"][row, : start + 1].eq(IGNORE).all()
    # masked history tokens enter with embed_keep 0, kept ones with 1
    hist = inputs["embed_keep"][inputs["input_ids"] >= v.visual_offset]
    assert set(hist.unique().tolist()) <= {0.0, 1.0} and (hist == 0).any()


# --- tokenizer health: the small run's tokenizer once collapsed onto one code ---------------------


def test_code_perplexity_counts_kept_tokens_only():
    from pigeon.models.history_encoder import code_perplexity

    ids = torch.tensor([[0, 1, 2, 3, 5, 5]])
    keep = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert code_perplexity(ids, keep, 8) == pytest.approx(4.0)  # uniform over 4 codes
    assert code_perplexity(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6), 8) == 1.0
    p = torch.tensor([0.5, 0.25, 0.25])
    expected = float(torch.exp(-(p * p.log()).sum()))
    assert code_perplexity(torch.tensor([[0, 0, 1, 2]]), torch.ones(1, 4), 8) == pytest.approx(
        expected
    )


def test_dead_codes_move_onto_encoder_outputs_and_live_ones_stay():
    from pigeon.models.history_encoder import Quantizer

    torch.manual_seed(0)
    q = Quantizer(dim=4, code_dim=3, codebook_size=8)
    live = q.codebook.weight[0].clone()
    z = F.normalize(torch.randn(2, 5, 3), dim=-1)
    ids = torch.zeros(2, 5, dtype=torch.long)  # collapsed: every token on code 0
    keep = torch.ones(2, 5)
    keep[1, 4] = 0  # a dropped token is never a restart target
    moved = [q.restart_dead_codes(ids, z, keep) for _ in range(200)]
    # usage of an unused code decays as 0.9^n from uniform; below 5% of uniform after 29 calls
    first = next(i for i, m in enumerate(moved) if m)
    assert first == math.ceil(math.log(0.05) / math.log(0.9)) - 1
    assert moved[first] == 7
    assert torch.equal(q.codebook.weight[0], live)
    pool = z.reshape(-1, 3)[keep.reshape(-1) > 0]
    distance = torch.cdist(q.codebook.weight[1:], pool).min(dim=1).values
    assert distance.max() < 0.1  # each restarted code sits on a kept encoder output (+1% noise)


def test_keep_budget_judges_the_decision_serving_makes():
    p = torch.full((2, 10), 0.6, requires_grad=True)
    budget = O.keep_budget(p, 0.6)
    assert float(budget.detach()) == pytest.approx(
        0.16
    )  # p = 0.6 everywhere: serving keeps every patch
    budget.backward()
    assert (p.grad > 0).all()  # descent lowers p(keep)
    assert float(O.keep_budget(torch.tensor([[0.9, 0.8, 0.2, 0.1, 0.4]]), 0.4)) == 0


def test_collapsed_tokenizer_stops_the_image_stage_after_a_quarter():
    from pigeon.training.loop import TrainConfig, TrainingError, check_tokenizer

    config = TrainConfig(stage="image", steps=100, batch_size=2, lr=1e-3, min_code_perplexity=8)
    collapsed = {"code_perplexity": 1.0, "keep_ratio": 1.0}
    check_tokenizer(collapsed, config, 23)  # too early to judge
    check_tokenizer({"code_perplexity": 9.5, "keep_ratio": 0.6}, config, 99)
    with pytest.raises(TrainingError, match=r"code perplexity 1.0 < train.min_code_perplexity=8"):
        check_tokenizer(collapsed, config, 24)


def test_reconstruction_term_adds_the_probe_mse_to_the_image_loss(setup):
    """image_objective with a training-only probe (a ConditionSketch beside a UNet without one) = the
    plain objective + weight x MSE(probe(condition),
    VAE latents), same random draws."""
    config, _ = setup
    config = dataclasses.replace(
        config, unet=dataclasses.replace(config.unet, condition_sketch=False)
    )
    model = make_model(config).eval()  # eval: no dead-code restarts between the two calls
    probe = ConditionSketch(config)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ac = torch.from_numpy(alphas_cumprod(config.scheduler)).float()
    torch.manual_seed(1)
    plain = O.image_objective(model, images, ac)
    torch.manual_seed(1)
    with_probe = O.image_objective(model, images, ac, probe=probe, reconstruct_weight=2.0)
    with torch.no_grad():
        tok = model.history_encoder.tokenize(O.encoder_input(model, images))
        prompt_embeds, _, _ = model.condition_adapter(tok.quantized, tok.token_keep)
        latents = image_latents(model, images)
        expected = F.mse_loss(probe(prompt_embeds), latents)
    assert probe(prompt_embeds).shape == latents.shape
    torch.testing.assert_close(with_probe - plain, 2.0 * expected, rtol=1e-4, atol=1e-6)


def test_the_condition_sketch_is_the_probe_of_a_sketching_unet(setup):
    """With `unet.condition_sketch` the reconstruction term trains the UNet's own sketch: the loss
    is the plain one + weight x MSE(sketch(condition), latents)."""
    config, _ = setup
    model = make_model(config).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ac = torch.from_numpy(alphas_cumprod(config.scheduler)).float()
    torch.manual_seed(1)
    plain = O.image_objective(model, images, ac)
    torch.manual_seed(1)
    weighted = O.image_objective(model, images, ac, reconstruct_weight=3.0)
    with torch.no_grad():
        tok = model.history_encoder.tokenize(O.encoder_input(model, images))
        prompt_embeds, _, _ = model.condition_adapter(tok.quantized, tok.token_keep)
        expected = F.mse_loss(
            model.unet.condition_sketch(prompt_embeds), image_latents(model, images)
        )
    torch.testing.assert_close(weighted - plain, 3.0 * expected, rtol=1e-4, atol=1e-6)


def test_condition_gain_is_zero_exactly_when_the_unet_cannot_see_its_condition(setup):
    """The health metric that would have caught the small run's UNet ignoring its tokens: cut
    every path from the condition into the UNet (cross-attention values, pooled embedding, the
    sketch's weights) and
    the gain is 0; an untouched random UNet does use the condition."""
    from pigeon.training.loop import condition_gain

    config, _ = setup
    model = make_model(config).eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert abs(condition_gain(model, images, seed=3)) > 1e-6
        for name, module in model.unet.named_modules():
            if name.endswith("attn2.to_v"):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
        model.unet.add_embedding.linear_1.weight[:, : config.condition_adapter.pooled_dim] = 0
        model.unet.condition_sketch.proj.weight.zero_()  # the sketch: its bias alone
        assert condition_gain(model, images, seed=3) == pytest.approx(0.0, abs=1e-7)


def test_perceptual_distance_is_the_evaluation_lpips_made_differentiable():
    """The VAE stage's perceptual term against the evaluation's own LPIPS-like distance on the same
    images (uint8 in, EfficientNet-Lite0 at the same size and blocks): the same number, zero for
    identical images, and a gradient that reaches the reconstruction."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from pigeon.evaluation.features import EfficientNetLite0, ENL0Config, lpips_from_maps
    from pigeon.training.perceptual import BLOCKS, PerceptualDistance

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    distance = PerceptualDistance(size=64)
    reference = EfficientNetLite0(ENL0Config(image_size=64, lpips_blocks=BLOCKS))
    expected = [
        lpips_from_maps(fa[1], fb[1])
        for fa, fb in zip(reference.features(a), reference.features(b), strict=True)
    ]

    def signed(x):
        return torch.from_numpy(x).float().permute(0, 3, 1, 2) / 127.5 - 1

    x = signed(a).requires_grad_()
    d = distance(x, signed(b))
    # float16 maps in the evaluation's cache; antialiasing is a no-op when upsampling
    assert float(d.detach()) == pytest.approx(np.mean(expected), rel=2e-3)
    assert float(distance(signed(a), signed(a))) == pytest.approx(0.0, abs=1e-6)
    d.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in distance.parameters())


def test_dpo_candidates_of_a_user_share_their_noise(setup):
    """One user's candidates differ by their reference mask ratio only: the same seed, hence the
    same initial latents and sampling streams in the pipeline."""
    from pigeon.inference.pipeline import request_streams
    from pigeon.training.data import ProceduralData
    from pigeon.training.dpo import candidate_requests
    from pigeon.training.loop import recipe

    config = recipe("small")["dpo"]
    assert config.dpo_seeds == "shared"
    user = ProceduralData(32).users(np.random.default_rng(0), 1, 3, 0.2)[0]
    requests = candidate_requests(user, config, seed=5)
    assert [r.reference_mask_ratio for r in requests] == list(config.dpo_ratios)
    assert len({r.seed for r in requests}) == 1
    noise = [request_streams(r.seed)[2].standard_normal(8) for r in requests]
    for n in noise[1:]:
        np.testing.assert_array_equal(n, noise[0])


def test_dpo_policy_trains_without_dropout(setup):
    """Stage 2's policy runs like its frozen reference (every dropout off, TRL's disable_dropout);
    other stages keep their dropout."""
    from pigeon.training.loop import StageModule, recipe

    config, tokenizer = setup
    builder = PromptBuilder(tokenizer, make_model(config).vocab)
    for stage, expect_training in (("dpo", False), ("sft", True)):
        model = make_model(config)
        StageModule(model, stage, builder, recipe("tiny")[stage]).train()
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert dropouts and all(m.training == expect_training for m in dropouts), stage
        assert model.personalizer.training  # the rest stays in training mode


def test_bf16_autocast_keeps_the_vae_loss(setup):
    """The bf16 recipe's forward pass gives the float32 loss within bfloat16 rounding."""
    config, _ = setup
    model = make_model(config).train()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    fp32 = O.vae_objective(model, images)
    torch.manual_seed(0)
    with torch.autocast("cpu", torch.bfloat16):
        bf16 = O.vae_objective(model, images)
    assert bf16.dtype == torch.float32
    assert float(bf16) == pytest.approx(float(fp32), rel=0.03)


def test_the_stage_table_names_real_links_batches_and_the_recipe_covers_it():
    """Every stage's chain link is a link the chain draws, the recipe has steps for every stage of
    every preset, and `pigeon train` offers exactly the table's stages (plus `all`)."""
    from pigeon.cli import build_parser
    from pigeon.config import ConfigError
    from pigeon.evaluation.chain import LINKS
    from pigeon.training.loop import RECIPE_STEPS, TrainConfig, recipe
    from pigeon.training.stages import STAGES

    assert {s.chain_link for s in STAGES.values()} - {None} <= set(LINKS)
    for preset_name, (steps, _, _) in RECIPE_STEPS.items():
        assert set(steps) == set(STAGE_NAMES), preset_name
        configs = recipe(preset_name)
        assert [configs[name].stage for name in STAGE_NAMES] == list(STAGE_NAMES)
        assert all(configs[name].steps == steps[name] for name in STAGE_NAMES)
    with pytest.raises(ConfigError, match="train.stage='rl' is not one of"):
        TrainConfig(stage="rl", steps=1, batch_size=1, lr=1e-3)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    stage_action = next(a for a in train._actions if a.dest == "stage")
    assert list(stage_action.choices) == [*STAGE_NAMES, "all"]
