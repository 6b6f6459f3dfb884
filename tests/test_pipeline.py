"""End-to-end behaviour of PigeonPipeline on the tiny preset (PyTorch runner)."""

import dataclasses

import numpy as np
import pytest
import torch

from pigeon.core.deadline import Deadline, DeadlineExceeded
from pigeon.core.images import ImageError, to_model_input
from pigeon.core.prompt import left_pad
from pigeon.diffusion.scheduler import make_sampler
from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline, RequestError
from pigeon.inference.runners import TorchRunner

from .conftest import emoji_like


@pytest.fixture
def pipe(tiny_model, tiny_config, tokenizer):
    return PigeonPipeline(tiny_config, tokenizer, TorchRunner(tiny_model))


def request(images, **kw):
    return GenerationRequest(history=images[:4], reference=images[5], text="a red ball", **kw)


def test_output_image_shape_and_timings(pipe, images):
    result = pipe(request(images))[0]
    assert result.image.shape == (32, 32, 3) and result.image.dtype == np.uint8
    assert set(result.timings) == {
        "preprocess",
        "history_encoder",
        "personalize",
        "condition",
        "denoise",
        "vae_decoder",
        "total",
    }
    assert 0 < len(result.tokens) <= 16


def test_same_seed_same_image_and_other_seed_other_image(pipe, images):
    a = pipe(request(images, seed=7))[0].image
    b = pipe(request(images, seed=7))[0].image
    c = pipe(request(images, seed=8))[0].image
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_request_gives_the_same_image_alone_or_in_a_batch(pipe, images):
    alone = pipe(request(images, seed=3))[0].image
    other = GenerationRequest(history=images[1:3], reference=images[0], text="two dogs", seed=9)
    batched = pipe([other, request(images, seed=3)])[1].image
    assert np.abs(alone.astype(int) - batched.astype(int)).max() <= 1


def test_img2img_last_step_equals_a_hand_written_single_ddim_step(pipe, images):
    """strength 1/steps keeps only t=0: encode the reference, noise it with the request's latent
    stream, one DDIM step to x0 over the conditional UNet, decode. Strength 1 lands far away."""
    from pigeon.core.images import to_model_input
    from pigeon.inference.pipeline import request_streams

    config, run = pipe.config, pipe.runner.run
    req = request(images, seed=5, steps=4, guidance=1.0, strength=0.25)
    result = pipe(req)[0]
    clean = run("vae_encoder", {"images": to_model_input(images[5], config.image_size)[None]})
    c, h = config.vae.latent_channels, config.latent_size
    noise = request_streams(5)[2].standard_normal((c, h, h), dtype=np.float32)[None]
    a0 = make_sampler(config.scheduler, 4, "ddim").a(0)
    x = np.sqrt(a0) * clean["latents"] + np.sqrt(1 - a0) * noise
    cond = pipe.condition([result.tokens])
    s = float(config.image_size)
    eps = run(
        "unet",
        {
            "latents": x.astype(np.float32),
            "timestep": np.zeros(1, np.float32),
            "prompt_embeds": cond["prompt_embeds"],
            "pooled_embeds": cond["pooled_embeds"],
            "time_ids": np.array([[s, s, 0, 0, s, s]], np.float32),
        },
    )["noise_pred"]
    x0 = (x - np.sqrt(1 - a0) * eps) / np.sqrt(a0)
    expected = run("vae_decoder", {"latents": x0.astype(np.float32)})["images"][0]
    expected = np.round(expected.transpose(1, 2, 0) * 255)
    assert np.abs(result.image - expected).max() <= 1
    far = pipe(dataclasses.replace(req, strength=1.0))[0].image.astype(float)
    assert np.abs(far - expected).mean() > 10


def test_guidance_one_equals_the_conditional_branch(pipe, images):
    """With guidance 1 the loop must equal a plain sampler loop over the conditional UNet alone."""
    cond = pipe.condition([np.arange(10)])
    rng = np.random.default_rng(0)
    latents = pipe.denoise(cond["prompt_embeds"], cond["pooled_embeds"], 3, 1.0, "ddim", [rng])
    sampler = make_sampler(pipe.config.scheduler, 3, "ddim")
    x = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    time_ids = np.array([[32, 32, 0, 0, 32, 32]], np.float32)
    for i, t in enumerate(sampler.timesteps):
        eps = pipe.runner.run(
            "unet",
            {
                "latents": x,
                "timestep": np.array([t], np.float32),
                "prompt_embeds": cond["prompt_embeds"],
                "pooled_embeds": cond["pooled_embeds"],
                "time_ids": time_ids,
            },
        )["noise_pred"]
        x = sampler.step(eps, i, x)
    np.testing.assert_allclose(latents, x, atol=1e-6)


def test_the_reference_input_reaches_every_unet_call_in_both_branches(
    tiny_config, tokenizer, images
):
    """unet.reference_input at guidance 2: the loop equals a hand-written CFG loop whose conditional
    and unconditional halves both carry the reference's latents; another reference, another image."""
    from pigeon.core.images import to_model_input

    from .conftest import make_model

    model = make_model(tiny_config)
    model.enable_reference_input()
    with torch.no_grad():  # as if trained: the reference's channels matter
        model.unet.conv_in.weight[:, tiny_config.vae.latent_channels :].normal_(0, 0.2)
    pipe = PigeonPipeline(model.config, tokenizer, TorchRunner(model))
    run, size = pipe.runner.run, tiny_config.image_size
    cond = pipe.condition([np.arange(10)])
    reference = to_model_input(images[5], size)[None]

    def loop(ref):
        rng = [np.random.default_rng(0)]
        return pipe.denoise(cond["prompt_embeds"], cond["pooled_embeds"], 3, 2.0, "ddim", rng, ref)

    clean = run("vae_encoder", {"images": reference})["latents"]
    sampler = make_sampler(pipe.config.scheduler, 3, "ddim")
    x = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    s = float(size)
    for i, t in enumerate(sampler.timesteps):
        eps = run(
            "unet",
            {
                "latents": np.concatenate([x, x]),
                "timestep": np.full(2, t, np.float32),
                "prompt_embeds": np.concatenate([cond["prompt_embeds"], 0 * cond["prompt_embeds"]]),
                "pooled_embeds": np.concatenate([cond["pooled_embeds"], 0 * cond["pooled_embeds"]]),
                "time_ids": np.array([[s, s, 0, 0, s, s]] * 2, np.float32),
                "reference_latents": np.concatenate([clean, clean]),
            },
        )["noise_pred"]
        eps_cond, eps_uncond = np.split(eps, 2)
        x = sampler.step(eps_uncond + 2.0 * (eps_cond - eps_uncond), i, x)
    np.testing.assert_allclose(loop(reference), x, atol=1e-5)
    other = loop(to_model_input(images[0], size)[None])
    assert np.abs(other - x).mean() > 1e-3
    with pytest.raises(RequestError, match="reference input needs the reference images"):
        loop(None)


def test_both_samplers_and_the_request_overrides_run(pipe, images):
    for sampler in ("ddim", "dpmpp_2m"):
        out = pipe(
            request(images, steps=3, guidance=2.0, sampler=sampler, reference_mask_ratio=0.5)
        )[0]
        assert out.image.shape == (32, 32, 3)


def test_any_image_mode_and_size_is_accepted(pipe):
    history = [
        emoji_like(0, size=50, alpha=True),
        np.full((1, 1, 3), 128, np.uint8),
        np.zeros((20, 64, 3), np.uint8),
    ]
    out = pipe(GenerationRequest(history=history, reference=emoji_like(1, 33), text="x"))[0]
    assert out.image.shape == (32, 32, 3)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"history": []}, "history is empty"),
        ({"history": "six"}, "history is empty"),
        ({"text": "  "}, "text is empty"),
        ({"text": "x" * 1001}, "text has 1001 characters"),
        ({"steps": 0}, r"steps=0 must be an integer in \[1, 1000\]"),
        ({"steps": 2.5}, r"steps=2.5"),
        ({"guidance": float("nan")}, "guidance=nan must be a finite number"),
        ({"guidance": -1.0}, "guidance=-1.0"),
        ({"reference_mask_ratio": 1.5}, r"reference_mask_ratio=1.5 must be in \[0, 1\]"),
        ({"seed": -1}, "seed=-1"),
        ({"sampler": "euler"}, "sampler='euler'"),
        ({"strength": 0.0}, r"strength=0.0 must be in \(0, 1\]"),
        ({"strength": float("nan")}, r"strength=nan must be in \(0, 1\]"),
        ({"timeout_ms": -5}, r"timeout_ms=-5 must be an integer in \[0, 3600000\]"),
        ({"timeout_ms": 2.5}, r"timeout_ms=2.5 must be an integer"),
    ],
)
def test_bad_requests_name_the_problem(pipe, images, change, message):
    with pytest.raises(RequestError, match=message):
        pipe(dataclasses.replace(request(images), **change))


def test_too_many_history_images(pipe, images):
    with pytest.raises(
        RequestError, match="history has 6 images, more than the configured maximum of 5"
    ):
        pipe(GenerationRequest(history=images, reference=images[0], text="x"))


@pytest.mark.parametrize(
    "bad,message",
    [
        (np.zeros((8, 8, 3), np.float32), "expected a uint8 array, got float32"),
        (np.zeros((8, 8), np.uint8), r"expected shape \(H, W, 3\) or \(H, W, 4\), got \(8, 8\)"),
        (np.zeros((0, 8, 3), np.uint8), r"expected shape .* got \(0, 8, 3\)"),
    ],
)
def test_bad_image_arrays_are_named(pipe, images, bad, message):
    with pytest.raises(ImageError, match=r"history\[1\]: " + message):
        pipe(GenerationRequest(history=[images[0], bad], reference=images[1], text="x"))


def test_a_prompt_over_the_personalizer_context_is_named(pipe, images):
    """939 text tokens + 4 history images are over tiny's 256-token prompt (max_positions 512)."""
    text = " ".join(f"qzx{i}" for i in range(150))[:999]
    long = GenerationRequest(history=images[:4], reference=images[5], text=text)
    message = (
        r"more than the personalizer's maximum of 256 \(half of personalizer.max_positions=512\)"
    )
    with pytest.raises(RequestError, match=message):
        pipe(long)


def test_a_good_request_works_after_a_bad_one(pipe, images):
    with pytest.raises(RequestError):
        pipe(dataclasses.replace(request(images), text=""))
    assert pipe(request(images))[0].image.shape == (32, 32, 3)


def counting_cancel(after: int):
    """A cancellation signal that turns true at its `after`-th question: where the loops ask."""
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > after

    return cancelled, asked


def test_the_denoising_loop_asks_its_deadline_before_every_step(pipe, images):
    """Stopped at its 4th question, the loop has run 3 of its 10 steps (DDIM from pure noise),
    and the error says so; with no stop it asks once per step."""
    cond = pipe.condition([np.arange(5)])
    rng = [np.random.default_rng(0)]
    args = (cond["prompt_embeds"], cond["pooled_embeds"], 10, 2.0, "ddim", rng)
    cancelled, asked = counting_cancel(3)
    with pytest.raises(DeadlineExceeded, match="cancelled the request after 3 of 10 denoising"):
        pipe.denoise(*args, deadline=Deadline(None, 0, cancelled))
    cancelled, asked = counting_cancel(10**6)
    pipe.denoise(*args, deadline=Deadline(None, 0, cancelled))
    assert len(asked) == 10


def test_a_request_past_its_timeout_stops_and_names_it(pipe, images):
    """timeout_ms=1 on a 1,000-step request: it stops with the budget in the message, long before
    its last step; a request without one (0) runs to the end."""
    with pytest.raises(DeadlineExceeded, match=r"timeout_ms=1 passed after \d+ of \d+"):
        pipe(request(images, steps=1000, timeout_ms=1))
    assert pipe(request(images, steps=3, timeout_ms=0))[0].image.shape == (32, 32, 3)


def test_a_passed_deadline_stops_token_generation_at_the_step_it_reached(pipe, images):
    """Deadline.check counts generated tokens: stopped at its 3rd question, 2 tokens are done."""
    cancelled, _ = counting_cancel(2)
    with pytest.raises(DeadlineExceeded, match="after 2 of 16 visual tokens"):
        pipe.decoder.generate(
            *generation_inputs(pipe, images), deadline=Deadline(None, 0, cancelled)
        )


def generation_inputs(pipe, images):
    """The personalizer's inputs for one request, as `PigeonPipeline.personalize` builds them."""
    size = pipe.config.history_encoder.image_size
    encoded = pipe.runner.run(
        "history_encoder", {"images": np.stack([to_model_input(i, size) for i in images[:3]])}
    )
    hist = [h[k > 0] for h, k in zip(encoded["token_ids"], encoded["token_keep"], strict=True)]
    batch = left_pad([pipe.prompts.build("a red ball", hist, [np.ones(len(h)) for h in hist])])
    p = pipe.config.history_encoder.num_patches
    reference = pipe.runner.run(
        "condition_adapter",
        {"token_ids": np.zeros((1, p), np.int64), "token_keep": np.ones((1, p), np.int64)},
    )
    # greedy or sampled, the loop asks before each token; min_new_tokens keeps it going
    config = dataclasses.replace(pipe.config.generation, min_new_tokens=p)
    return batch, reference["reference_embedding"], config, p, [np.random.default_rng(0)]
