"""Our NumPy samplers against diffusers' schedulers (the oracle) on the same inputs."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from pigeon.config import ConfigError, SchedulerConfig
from pigeon.diffusion.guidance import cfg_batch, cfg_combine, split_guidance
from pigeon.diffusion.scheduler import (
    add_noise,
    alphas_cumprod,
    make_sampler,
    make_timesteps,
    start_index,
)


def fake_model(x: np.ndarray, i: int) -> np.ndarray:
    """A deterministic, input-dependent 'network' so both loops see the same outputs."""
    return np.sin(3 * x + i)


def run_both(ours, theirs, steps, seed=0):
    x = np.random.default_rng(seed).standard_normal((2, 4, 8, 8))
    xt = torch.from_numpy(x.copy())
    for i, t in enumerate(ours.timesteps):
        x = ours.step(fake_model(x, i), i, x)
        xt = theirs.step(torch.from_numpy(fake_model(xt.numpy(), i)), int(t), xt).prev_sample
    return x, xt.numpy()


def diffusers_kwargs(c: SchedulerConfig) -> dict:
    return dict(
        num_train_timesteps=c.num_train_timesteps,
        beta_start=c.beta_start,
        beta_end=c.beta_end,
        beta_schedule=c.beta_schedule,
        prediction_type=c.prediction_type,
        timestep_spacing=c.timestep_spacing,
    )


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [4, 25])
def test_ddim_matches_diffusers(spacing, prediction, steps):
    config = SchedulerConfig(timestep_spacing=spacing, prediction_type=prediction)
    ref = DDIMScheduler(**diffusers_kwargs(config), clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(steps)
    ours = make_sampler(config, steps, "ddim")
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    x, xr = run_both(ours, ref, steps)
    # diffusers keeps the schedule in float32, we in float64
    np.testing.assert_allclose(x, xr, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpm_solver_pp_2m_matches_diffusers(prediction):
    config = SchedulerConfig(timestep_spacing="trailing", prediction_type=prediction)
    ref = DPMSolverMultistepScheduler(
        **diffusers_kwargs(config),
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    ref.set_timesteps(10)
    ours = make_sampler(config, 10, "dpmpp_2m")
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    x, xr = run_both(ours, ref, 10)
    np.testing.assert_allclose(x, xr, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_zero_terminal_snr_ddim_matches_diffusers_rescaled_betas(spacing):
    """Lin et al.'s rescale: the same schedule and DDIM walk as diffusers' rescale_betas_zero_snr,
    with the last timestep pure noise (a_T 2^-24, as diffusers' Euler and DPM-Solver clip it)."""
    config = SchedulerConfig(
        timestep_spacing=spacing, prediction_type="v_prediction", zero_terminal_snr=True
    )
    ref = DDIMScheduler(**diffusers_kwargs(config), rescale_betas_zero_snr=True, clip_sample=False)
    ours_a, ref_a = alphas_cumprod(config), ref.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours_a[:-1], ref_a[:-1], rtol=2e-5, atol=1e-9)
    assert ref_a[-1] == 0.0 and ours_a[-1] == 2.0**-24
    assert ours_a[0] == pytest.approx(alphas_cumprod(SchedulerConfig())[0])
    ref.set_timesteps(25)
    ours = make_sampler(config, 25, "ddim")
    x, xr = run_both(ours, ref, 25)
    # trailing starts at T, where our sqrt(a_T) = 2^-12 against diffusers' 0 moves x0_hat by ~2e-4 x
    np.testing.assert_allclose(x, xr, atol=1e-3, rtol=1e-3)


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(ConfigError, match="zero_terminal_snr=true needs .*v_prediction.*'epsilon'"):
        SchedulerConfig(zero_terminal_snr=True)


def test_add_noise_matches_diffusers():
    config = SchedulerConfig()
    ref = DDIMScheduler(**diffusers_kwargs(config))
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((3, 4, 8, 8)), rng.standard_normal((3, 4, 8, 8))
    t = np.array([0, 500, 999])
    ours = add_noise(x0, noise, alphas_cumprod(config)[t])
    theirs = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


@pytest.mark.parametrize("steps,strength", [(25, 0.6), (25, 0.3), (10, 0.75), (4, 0.5), (7, 1.0)])
def test_img2img_start_matches_diffusers_get_timesteps(steps, strength):
    """diffusers' img2img keeps scheduler.timesteps[steps - min(int(steps * strength), steps):]."""
    ref = DDIMScheduler(**diffusers_kwargs(SchedulerConfig()))
    ref.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    ours = make_sampler(SchedulerConfig(), steps, "ddim")
    np.testing.assert_array_equal(
        ours.timesteps[start_index(steps, strength) :], ref.timesteps[t_start:].numpy()
    )


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_img2img_with_an_exact_noise_oracle_returns_the_clean_image(sampler):
    """Started from x0 noised at the first kept timestep, a model that predicts the true noise must
    lead every step back to x0 exactly: the start and the loop are consistent."""
    config = SchedulerConfig()
    steps, strength = 10, 0.55
    ours = make_sampler(config, steps, sampler)
    rng = np.random.default_rng(3)
    x0, noise = rng.standard_normal((2, 4, 8, 8)), rng.standard_normal((2, 4, 8, 8))
    start = start_index(steps, strength)
    x = add_noise(x0, noise, ours.a(int(ours.timesteps[start])))
    for i in range(start, steps):
        a_t = ours.a(int(ours.timesteps[i]))
        eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)  # the noise that x holds around x0
        x = ours.step(eps, i, x)
    np.testing.assert_allclose(x, x0, atol=1e-8)


def test_img2img_always_runs_one_step_and_rejects_bad_strength():
    assert start_index(10, 0.01) == 9  # diffusers would run none
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=f"strength={bad} must be in"):
            start_index(10, bad)


def test_bad_step_counts_are_rejected():
    with pytest.raises(ValueError, match=r"steps=0 must be in \[1, 1000\]"):
        make_timesteps(SchedulerConfig(), 0)


def test_cfg_with_guidance_one_is_the_conditional_branch():
    rng = np.random.default_rng(0)
    cond, uncond = rng.standard_normal((2, 2, 4, 8, 8))
    np.testing.assert_allclose(cfg_combine(cond, uncond, 1.0), cond, atol=1e-12)
    # at scale 1 the unconditional half is not even computed
    ctx, pooled = cfg_batch(np.ones((2, 3, 4)), np.ones((2, 5)), 1.0)
    assert ctx.shape[0] == 2 and pooled.shape[0] == 2


def test_cfg_batch_uses_zero_negatives():
    ctx, pooled = cfg_batch(np.ones((2, 3, 4)), np.ones((2, 5)), 7.0)
    assert ctx.shape == (4, 3, 4) and not ctx[2:].any() and not pooled[2:].any()
    noise = np.concatenate([np.full((2, 1), 2.0), np.full((2, 1), 1.0)])
    np.testing.assert_allclose(split_guidance(noise, 7.0), 1.0 + 7.0 * (2.0 - 1.0))
