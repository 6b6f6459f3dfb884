"""Noise schedules and samplers in NumPy, shared by the PyTorch, ONNX Runtime and Triton paths.

Notation (DDIM, Song et al. 2021, eq. 12 with eta = 0; DPM-Solver++, Lu et al. 2022, Alg. 2):
    a_t          alphas_cumprod[t]            alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t)
    lambda_t     log(alpha_t / sigma_t)       half log-SNR
    x0_hat       predicted clean sample       eps_hat: predicted noise

Both samplers walk the same timestep grid (`timesteps`) and keep the model call outside, in the visible
denoising loop: `sampler.step(model_output, i, sample) -> sample`.
"""

from __future__ import annotations

import math

import numpy as np

from pigeon.config import SchedulerConfig


def make_betas(config: SchedulerConfig) -> np.ndarray:
    """beta_t for t = 0 .. T-1 (float64), as diffusers defines each named schedule."""
    t = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, t, dtype=np.float64)
    if config.beta_schedule == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, t, dtype=np.float64) ** 2
    # squaredcos_cap_v2: Nichol & Dhariwal 2021, alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)])


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1 on a_t: shift and scale sqrt(a_t) so that the first stays and the
    last is 0 (zero terminal SNR), the shape of the schedule in between kept."""
    root = np.sqrt(alphas_cumprod)
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    return root**2


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    a = np.cumprod(1.0 - make_betas(config))
    if config.zero_terminal_snr:
        a = rescale_zero_terminal_snr(a)
        # a_T = 0 exactly leaves log-SNR (DPM-Solver) and 1 / SNR (Min-SNR) infinite; diffusers' Euler
        # and DPM-Solver schedulers clip it to the same float32-sized value
        a[-1] = 2.0**-24
    return a


def make_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """Descending integer timesteps (num_steps,), with diffusers' "leading" or "trailing" spacing."""
    if num_steps < 1 or num_steps > config.num_train_timesteps:
        raise ValueError(f"steps={num_steps} must be in [1, {config.num_train_timesteps}]")
    t = config.num_train_timesteps
    if config.timestep_spacing == "leading":
        return (np.arange(num_steps) * (t // num_steps))[::-1].astype(np.int64)
    return (np.round(np.arange(t, 0, -t / num_steps)) - 1).astype(np.int64)


def start_index(num_steps: int, strength: float) -> int:
    """The first of `num_steps` timesteps that an image-to-image run with `strength` in (0, 1] takes:
    it skips the noisiest (1 - strength) share, as diffusers' img2img does, but always runs one step."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]")
    return num_steps - max(1, min(num_steps, int(num_steps * strength)))


def add_noise(x0: np.ndarray, noise: np.ndarray, a_t: np.ndarray) -> np.ndarray:
    """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) eps; a_t broadcast over the batch axis."""
    a_t = np.asarray(a_t).reshape(-1, *([1] * (x0.ndim - 1)))
    return np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * noise


class Sampler:
    """Common state: the schedule, the timestep grid and the conversion of model outputs."""

    def __init__(self, config: SchedulerConfig, num_steps: int) -> None:
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.timesteps = make_timesteps(config, num_steps)
        self.init_noise_sigma = 1.0

    def a(self, t: int) -> float:
        """a_t, with a_{-1} = 1 (the clean end of the trajectory, diffusers' set_alpha_to_one)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def prev_timestep(self, i: int) -> int:
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def predict_x0_eps(
        self, model_output: np.ndarray, t: int, sample: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        a_t = self.a(t)
        if self.config.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        else:  # v-prediction: v = alpha_t eps - sigma_t x0
            x0 = math.sqrt(a_t) * sample - math.sqrt(1 - a_t) * model_output
            eps = math.sqrt(a_t) * model_output + math.sqrt(1 - a_t) * sample
        return x0, eps

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class DDIMSampler(Sampler):
    """Deterministic DDIM (eta = 0)."""

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        t, t_prev = int(self.timesteps[i]), self.prev_timestep(i)
        # 1. x0_hat and eps_hat from the model output
        x0, eps = self.predict_x0_eps(model_output, t, sample)
        # 2. x_{t-1} = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps_hat
        a_prev = self.a(t_prev)
        return (math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps).astype(sample.dtype)


class DPMSolverPlusPlus2M(Sampler):
    """DPM-Solver++(2M), data prediction, midpoint form; first order on the first and last steps.

    Good images in about 10 steps where DDIM needs about 25.
    """

    def __init__(self, config: SchedulerConfig, num_steps: int) -> None:
        super().__init__(config, num_steps)
        self.previous_x0: np.ndarray | None = None
        self.previous_h: float | None = None

    def alpha_sigma_lambda(self, t: int) -> tuple[float, float, float]:
        if t < 0:
            return 1.0, 0.0, math.inf
        a = self.a(t)
        alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        t, t_next = int(self.timesteps[i]), self.prev_timestep(i)
        x0, _ = self.predict_x0_eps(model_output, t, sample)
        _, sigma_s, lambda_s = self.alpha_sigma_lambda(t)
        alpha_t, sigma_t, lambda_t = self.alpha_sigma_lambda(t_next)
        h = lambda_t - lambda_s
        last = i == len(self.timesteps) - 1
        if t_next < 0:
            out = x0  # sigma = 0: the solution is the data prediction
        elif self.previous_x0 is None or last:
            # first order (DPM-Solver++ 1 = DDIM): x_t = (sigma_t/sigma_s) x - alpha_t (e^-h - 1) x0
            out = (sigma_t / sigma_s) * sample - alpha_t * math.expm1(-h) * x0
        else:
            r = self.previous_h / h
            d0, d1 = x0, (x0 - self.previous_x0) / r
            out = (sigma_t / sigma_s) * sample - alpha_t * math.expm1(-h) * (d0 + 0.5 * d1)
        self.previous_x0, self.previous_h = x0, h
        return np.asarray(out, dtype=sample.dtype)


SAMPLERS = {"ddim": DDIMSampler, "dpmpp_2m": DPMSolverPlusPlus2M}


def make_sampler(config: SchedulerConfig, num_steps: int, name: str | None = None) -> Sampler:
    name = name or config.sampler
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](config, num_steps)
