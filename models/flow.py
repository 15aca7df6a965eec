"""Rectified-flow math as pure functions: path, timestep samplers, schedules, solvers, guidance.

The loss is a per-sample mean squared velocity error over each sample's own tokens
(``per_sample_mse`` beside the packed-batch code, since packing decides what a sample is).

Time convention (SD3): t = 0 is data, t = 1 is noise.

    x_t = (1 - t) x_0 + t eps,        eps ~ N(0, I)
    v   = dx_t/dt = eps - x_0          (the regression target)

Sampling integrates dx/dt = v(x_t, t) from t = 1 (x_1 = noise) down to t = 0 (x_0 = data).
Letters: B batch; t always has shape (B,) when passed to a velocity function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

_TINY = 2.0**-24
"""Samplers clamp t to [_TINY, 1 - _TINY]: the open interval in float32 (1 - 2^-24 is representable)."""

_MAX_SWAY = 2.0 / (math.pi - 2.0)
"""Largest s for which u + s (cos(pi u / 2) - 1 + u) stays monotone (its slope is 0 at u = 1)."""


# ---------------------------------------------------------------------------------------------
# Path
# ---------------------------------------------------------------------------------------------


def expand_t(t: Tensor, x: Tensor) -> Tensor:
    """Reshape t (B,) to (B, 1, ..., 1) so it broadcasts against x; t already of x.dim() dims is kept."""
    if t.dim() == x.dim():
        return t
    return t.reshape(-1, *[1] * (x.dim() - 1))


def interpolate(x_0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x_0 + t eps: the straight path from data (t=0) to noise (t=1)."""
    t = expand_t(t, x_0)
    return (1 - t) * x_0 + t * eps


def velocity_target(x_0: Tensor, eps: Tensor) -> Tensor:
    """v = d x_t / dt = eps - x_0, constant along each straight path."""
    return eps - x_0


# ---------------------------------------------------------------------------------------------
# Training timesteps
# ---------------------------------------------------------------------------------------------


class TimestepSampler:
    """Draws n training times in the open interval (0, 1), float32. Chosen in YAML by class_path
    (a plain base class rather than a Protocol, so the config parser can offer its subclasses)."""

    def __call__(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def _open_unit(t: Tensor) -> Tensor:
    """float32 t kept strictly inside (0, 1): t = 0 has no noise and t = 1 no signal to learn from."""
    return t.float().clamp(_TINY, 1.0 - _TINY)


@dataclass(frozen=True)
class UniformT(TimestepSampler):
    """t ~ U(0, 1): the plain rectified-flow choice."""

    def __call__(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        return _open_unit(torch.rand(n, generator=generator, device=device))


@dataclass(frozen=True)
class LogitNormalT(TimestepSampler):
    """t = sigmoid(mean + std z), z ~ N(0, 1): SD3's default, more weight on the middle times."""

    mean: float = 0.0
    """Location in logit space; > 0 moves the median sigmoid(mean) towards noise."""
    std: float = 1.0
    """Spread in logit space; small concentrates t around sigmoid(mean)."""

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"LogitNormalT.std must be > 0, got {self.std}")

    def __call__(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        z = torch.randn(n, generator=generator, device=device)
        return _open_unit(torch.sigmoid(self.mean + self.std * z))


@dataclass(frozen=True)
class ModeT(TimestepSampler):
    """SD3 "mode sampling with heavy tails": t = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1).

    s = 0 is uniform; s > 0 favours the middle, s < 0 the ends. The map is monotone (a valid
    density) only for -1 <= s <= 2 / (pi - 2) ~ 1.75. E[t] = 1/2 for every s.
    """

    scale: float = 1.29
    """s in [-1, 2 / (pi - 2)]; SD3 found 1.29 best among its mode settings."""

    def __post_init__(self) -> None:
        if not -1.0 <= self.scale <= _MAX_SWAY:
            raise ValueError(f"ModeT.scale must be in [-1, {_MAX_SWAY:.4f}] to keep t monotone in u, got {self.scale}")

    def __call__(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        u = torch.rand(n, generator=generator, device=device)
        t = 1 - u - self.scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        return _open_unit(t)


@dataclass(frozen=True)
class UShapedT(TimestepSampler):
    """Density p(t) ∝ cosh(a (t - 1/2)) on (0, 1): U-shaped, more weight near data and noise.

    Drawn by inverse CDF. F(t) = (sinh(a (t - 1/2)) + sinh(a/2)) / (2 sinh(a/2)), so
    t = 1/2 + asinh((2u - 1) sinh(a/2)) / a with u ~ U(0, 1). Ends / middle density ratio is cosh(a/2).
    """

    a: float = 4.0
    """Sharpness; a -> 0 tends to uniform, a = 4 makes the ends cosh(2) ~ 3.8x the middle."""

    def __post_init__(self) -> None:
        if not self.a > 0:
            raise ValueError(f"UShapedT.a must be > 0, got {self.a}")

    def __call__(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        u = torch.rand(n, generator=generator, device=device)
        t = 0.5 + torch.asinh((2 * u - 1) * math.sinh(self.a / 2)) / self.a
        return _open_unit(t)


def drop_mask(
    n: int, p: float, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Bool (n,), True = drop this sample's condition (use the null one), each with probability p.

    Training with dropped conditions gives the same network an unconditional velocity for CFG.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability p must be in [0, 1], got {p}")
    return torch.rand(n, generator=generator, device=device) < p  # rand is in [0, 1): p=0 none, p=1 all


# ---------------------------------------------------------------------------------------------
# Resolution shift and sampling schedule
# ---------------------------------------------------------------------------------------------


def shift_t(t: Tensor, shift: float) -> Tensor:
    """t' = shift t / (1 + (shift - 1) t) (SD3): fixes 0 and 1, shift > 1 moves times towards noise.

    Larger images/longer clips keep more signal at a given t, so they need more time near noise.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (shift * t + (1 - t))  # = shift t / (1 + (shift - 1) t), exact at t = 0 and 1


def shift_for_tokens(n_tokens: int, base_tokens: int = 256, base_shift: float = 1.0) -> float:
    """shift = base_shift * sqrt(n_tokens / base_tokens) (SD3's resolution rule, tokens for pixels).

    SD3 matches the signal-to-noise ratio of a base resolution: with n times the values, noise
    must be sqrt(n) times stronger, which is the shift above. Monotone in n_tokens.
    """
    if n_tokens < 1 or base_tokens < 1:
        raise ValueError(f"n_tokens and base_tokens must be >= 1, got {n_tokens} and {base_tokens}")
    if not base_shift > 0:
        raise ValueError(f"base_shift must be > 0, got {base_shift}")
    return base_shift * math.sqrt(n_tokens / base_tokens)


def _check_grid(steps: int, shift: float, sway: float | None) -> None:
    """One-line errors for a bad sampling schedule, shared by time_grid and the solver configs."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"sampling steps must be an int >= 1, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"sampling shift must be > 0, got {shift}")
    if sway is not None and not -1.0 <= sway <= _MAX_SWAY:
        raise ValueError(f"sway must be in [-1, {_MAX_SWAY:.4f}] to keep the grid monotone, got {sway}")


def time_grid(
    steps: int, *, shift: float = 1.0, sway: float | None = None, device: torch.device | str | None = None
) -> Tensor:
    """(steps + 1,) float32 times from exactly 1.0 (noise) down to exactly 0.0 (data).

    Built in float64: u uniform in [0, 1] with F5-TTS's convention (u = 0 noise, u = 1 data),
    then sway u' = u + s (cos(pi u / 2) - 1 + u) (s < 0 crowds steps near noise, s = -1 gives
    u' = 1 - cos(pi u / 2)), then t = shift_t(1 - u', shift).
    """
    _check_grid(steps, shift, sway)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=device)
    if sway is not None:
        u = u + sway * (torch.cos(math.pi / 2 * u) - 1 + u)
    t = shift_t(1 - u, shift)
    t[0], t[-1] = 1.0, 0.0  # cos(pi/2) is 6e-17, not 0: pin the ends
    return t.float()


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""(x_t, t of shape (B,)) -> v, the model's velocity at x_t."""


def _steps(times: Tensor, progress: bool) -> Iterable[tuple[Tensor, Tensor]]:
    pairs = list(zip(times[:-1], times[1:]))
    if progress:
        from tqdm import tqdm

        return tqdm(pairs, desc="sampling", unit="step", leave=False)
    return pairs


def euler_sample(v_fn: VelocityFn, x_1: Tensor, times: Tensor, progress: bool = False) -> Tensor:
    """Integrate dx/dt = v over the decreasing grid `times` (1 -> 0) with Euler: one call per step."""
    times = times.to(x_1.device)
    x = x_1
    for t_cur, t_next in _steps(times, progress):
        x = x + (t_next - t_cur) * v_fn(x, t_cur.expand(x.shape[0]))
    return x


def heun_sample(v_fn: VelocityFn, x_1: Tensor, times: Tensor, progress: bool = False) -> Tensor:
    """Heun (explicit trapezoid), second order: two velocity calls per step, including the last.

    Unlike EDM we do not fall back to Euler on the step to t = 0: EDM does so because its
    derivative divides by sigma = 0, while the rectified-flow velocity is finite at t = 0.
    """
    times = times.to(x_1.device)
    x = x_1
    for t_cur, t_next in _steps(times, progress):
        dt = t_next - t_cur
        v = v_fn(x, t_cur.expand(x.shape[0]))
        x_euler = x + dt * v
        x = x + dt / 2 * (v + v_fn(x_euler, t_next.expand(x.shape[0])))
    return x


def cfg_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: v_uncond + scale (v_cond - v_uncond); 1 = conditional, 0 = unconditional."""
    return v_uncond + scale * (v_cond - v_uncond)


class Sampler:
    """ODE sampler from noise (t=1) to data (t=0). A plain (non-dataclass) base class so YAML
    picks a solver (Euler, Heun) by class_path."""

    steps: int

    def __call__(self, v_fn: VelocityFn, x_1: Tensor, shift: float | None = None, progress: bool = False) -> Tensor:
        raise NotImplementedError  # pragma: no cover


@dataclass(frozen=True)
class GridSampler(Sampler):
    """A one-step solver applied on time_grid(steps, shift, sway)."""

    steps: int = 50
    """Number of integration steps (Euler: one velocity call each, Heun: two)."""
    shift: float = 1.0
    """Resolution shift of the grid (see shift_t); > 1 spends more steps near noise."""
    sway: float | None = None
    """F5-TTS sway coefficient in [-1, 1.75]; < 0 spends more steps near noise; None = off."""

    def __post_init__(self) -> None:
        _check_grid(self.steps, self.shift, self.sway)

    def solve(self, v_fn: VelocityFn, x_1: Tensor, times: Tensor, progress: bool) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def __call__(self, v_fn: VelocityFn, x_1: Tensor, shift: float | None = None, progress: bool = False) -> Tensor:
        """Noise x_1 -> sample x_0. `shift` overrides the grid's shift (the model passes the one it trained with)."""
        shift = self.shift if shift is None else shift
        return self.solve(v_fn, x_1, time_grid(self.steps, shift=shift, sway=self.sway, device=x_1.device), progress)


@dataclass(frozen=True)
class Euler(GridSampler):
    """Euler sampler: `steps` velocity calls."""

    def solve(self, v_fn: VelocityFn, x_1: Tensor, times: Tensor, progress: bool) -> Tensor:
        return euler_sample(v_fn, x_1, times, progress)


@dataclass(frozen=True)
class Heun(GridSampler):
    """Heun (trapezoid) sampler: 2 * `steps` velocity calls, second order."""

    def solve(self, v_fn: VelocityFn, x_1: Tensor, times: Tensor, progress: bool) -> Tensor:
        return heun_sample(v_fn, x_1, times, progress)
