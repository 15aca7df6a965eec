"""models/flow.py against closed forms, in float64 where the numerics matter.

Convention under test: t = 0 data, t = 1 noise, x_t = (1 - t) x_0 + t eps, v = eps - x_0.
"""

from __future__ import annotations

import math

import pytest
import torch

from models import flow
from models.flow import (
    Euler,
    Heun,
    LogitNormalT,
    ModeT,
    TimestepSampler,
    UniformT,
    UShapedT,
)
from models.packing import Layout
from models.tokens import per_sample_mse

N_T = 200_000  # timestep draws per sampler check: std error of a mean ~ 7e-4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Path
# ---------------------------------------------------------------------------------------------


def test_expand_t_shapes():
    x = torch.zeros(3, 4, 5, 6)
    assert flow.expand_t(torch.rand(3), x).shape == (3, 1, 1, 1)
    assert flow.expand_t(torch.rand(3, 1, 1, 1), x).shape == (3, 1, 1, 1)
    assert flow.expand_t(torch.tensor(0.5), x).shape == (1, 1, 1, 1)


def test_interpolate_endpoints():
    g = gen()
    x_0, eps = torch.randn(4, 3, 8, generator=g, dtype=torch.float64), torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(flow.interpolate(x_0, eps, torch.zeros(4, dtype=torch.float64)), x_0, rtol=0, atol=0)
    torch.testing.assert_close(flow.interpolate(x_0, eps, torch.ones(4, dtype=torch.float64)), eps, rtol=0, atol=0)


def test_velocity_is_time_derivative_of_path():
    g = gen(1)
    x_0, eps = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.8 + 0.1
    h = 1e-6
    fd = (flow.interpolate(x_0, eps, t + h) - flow.interpolate(x_0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, flow.velocity_target(x_0, eps), rtol=0, atol=1e-8)


def test_one_euler_jump_from_x_t_recovers_x_0():
    """x_0 = x_t - t v: the straight path makes one Euler jump to t = 0 exact (what previews rely on)."""
    g = gen(2)
    x_0, eps = torch.randn(6, 2, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64)
    x_t = flow.interpolate(x_0, eps, t)
    torch.testing.assert_close(x_t - flow.expand_t(t, x_t) * flow.velocity_target(x_0, eps), x_0, rtol=0, atol=1e-12)


def gaussian_velocity(x_t: torch.Tensor, t: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Exact E[eps - x_0 | x_t] for x_0 ~ N(mean, std^2) elementwise: the ground truth the solvers are tested against.

    (v, x_t) are jointly Gaussian with E[v] = -mean, E[x_t] = (1 - t) mean,
    Var(x_t) = (1 - t)^2 std^2 + t^2 and Cov(v, x_t) = t - (1 - t) std^2, so
    E[v | x_t] = -mean + Cov / Var * (x_t - (1 - t) mean); Var > 0 on [0, 1] when std > 0.
    """
    t = flow.expand_t(t, x_t)
    var = (1 - t) ** 2 * std**2 + t**2
    cov = t - (1 - t) * std**2
    return -mean + cov / var * (x_t - (1 - t) * mean)


def test_gaussian_velocity_matches_regression_and_ends():
    """E[v | x_t] is linear in x_t for Gaussian data: compare with a least-squares fit on samples."""
    mean, std, n = 1.5, 0.5, 400_000
    g = gen(3)
    x_0 = mean + std * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    for t_val in (0.2, 0.7):
        t = torch.full((n,), t_val, dtype=torch.float64)
        x_t, v = flow.interpolate(x_0, eps, t), flow.velocity_target(x_0, eps)
        design = torch.stack([torch.ones_like(x_t), x_t], dim=1)
        coef = torch.linalg.lstsq(design, v[:, None]).solution[:, 0]
        sd_t = math.sqrt((1 - t_val) ** 2 * std**2 + t_val**2)  # probe within the bulk of x_t
        probe = (1 - t_val) * mean + sd_t * torch.tensor([-1.5, 0.0, 1.5], dtype=torch.float64)
        exact = gaussian_velocity(probe, torch.full((3,), t_val, dtype=torch.float64), mean, std)
        torch.testing.assert_close(coef[0] + coef[1] * probe, exact, rtol=0, atol=0.01)
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(gaussian_velocity(x, torch.zeros(5, dtype=torch.float64), mean, std), -x)  # v = -x_0
    torch.testing.assert_close(gaussian_velocity(x, torch.ones(5, dtype=torch.float64), mean, std), x - mean)


# ---------------------------------------------------------------------------------------------
# Timestep samplers
# ---------------------------------------------------------------------------------------------


def _moments_over_u(f) -> tuple[float, float]:
    """Mean and std of f(u), u ~ U(0, 1), by the midpoint rule."""
    m = 200_000
    t = f((torch.arange(m, dtype=torch.float64) + 0.5) / m)
    return t.mean().item(), t.std(unbiased=False).item()


def _moments_from_density(p) -> tuple[float, float]:
    m = 200_000
    t = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    w = p(t) / p(t).sum()
    mu = (w * t).sum().item()
    return mu, math.sqrt((w * (t - mu) ** 2).sum().item())


def _logit_normal_moments(mean: float, std: float) -> tuple[float, float]:
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    w = torch.exp(-z**2 / 2)
    w = w / w.sum()
    t = torch.sigmoid(mean + std * z)
    mu = (w * t).sum().item()
    return mu, math.sqrt((w * (t - mu) ** 2).sum().item())


def _mode_t(s: float):
    return lambda u: 1 - u - s * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def _ushaped_cdf(a: float):
    return lambda t: (torch.sinh(a * (t - 0.5)) + math.sinh(a / 2)) / (2 * math.sinh(a / 2))


def _logit_normal_cdf(mean: float, std: float):
    return lambda t: torch.special.ndtr((torch.logit(t) - mean) / std)


CASES = [
    (UniformT(), (0.5, math.sqrt(1 / 12)), lambda t: t),
    (LogitNormalT(), _logit_normal_moments(0.0, 1.0), _logit_normal_cdf(0.0, 1.0)),
    (LogitNormalT(mean=1.0, std=0.5), _logit_normal_moments(1.0, 0.5), _logit_normal_cdf(1.0, 0.5)),
    (ModeT(), _moments_over_u(_mode_t(1.29)), None),
    (ModeT(scale=-0.8), _moments_over_u(_mode_t(-0.8)), None),
    (ModeT(scale=0.0), (0.5, math.sqrt(1 / 12)), lambda t: t),  # scale 0 is uniform in distribution
    (UShapedT(), _moments_from_density(lambda t: torch.cosh(4.0 * (t - 0.5))), _ushaped_cdf(4.0)),
    (UShapedT(a=1.0), _moments_from_density(lambda t: torch.cosh(1.0 * (t - 0.5))), _ushaped_cdf(1.0)),
]


@pytest.mark.parametrize("sampler, moments, cdf", CASES, ids=["uniform", "logit-normal", "logit-normal-shifted", "mode", "mode-negative", "mode-0", "u-shaped", "u-shaped-a1"])
def test_timestep_sampler_distribution(sampler, moments, cdf):
    assert isinstance(sampler, TimestepSampler)
    t = sampler(N_T, generator=gen(4))
    assert t.shape == (N_T,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    mean, std = moments
    assert abs(t.double().mean().item() - mean) < 4e-3, (t.mean().item(), mean)
    assert abs(t.double().std().item() - std) < 4e-3, (t.std().item(), std)
    if cdf is not None:  # Kolmogorov-Smirnov distance against the exact CDF (2/sqrt(n): p ~ 1e-3)
        ts = t.double().sort().values
        emp = torch.arange(1, N_T + 1, dtype=torch.float64) / N_T
        assert (emp - cdf(ts)).abs().max().item() < 2 / math.sqrt(N_T)


@pytest.mark.parametrize("sampler", [UniformT(), LogitNormalT(), ModeT(), UShapedT()], ids=repr)
def test_timestep_sampler_reproducible(sampler):
    torch.testing.assert_close(sampler(1000, generator=gen(7)), sampler(1000, generator=gen(7)), rtol=0, atol=0)
    assert not torch.equal(sampler(1000, generator=gen(7)), sampler(1000, generator=gen(8)))


def test_logit_normal_median_and_open_interval():
    assert abs(LogitNormalT()(N_T, generator=gen(5)).median().item() - 0.5) < 5e-3
    assert abs(LogitNormalT(mean=1.0)(N_T, generator=gen(5)).median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 5e-3
    wide = LogitNormalT(std=60.0)(N_T, generator=gen(5))  # sigmoid saturates in float32: must be clamped
    assert (wide > 0).all() and (wide < 1).all()


def test_ushaped_has_more_mass_near_ends():
    t = UShapedT()(N_T, generator=gen(6))
    ends = ((t < 0.1) | (t > 0.9)).double().mean().item()
    middle = ((t > 0.4) & (t < 0.6)).double().mean().item()
    assert ends > 2 * middle and ends > 0.2  # uniform would give 0.2 for both


@pytest.mark.parametrize("bad", [lambda: LogitNormalT(std=0.0), lambda: ModeT(scale=2.0), lambda: ModeT(scale=-1.5), lambda: UShapedT(a=0.0)])
def test_timestep_sampler_rejects_bad_params(bad):
    with pytest.raises(ValueError):
        bad()


# ---------------------------------------------------------------------------------------------
# Shift and time grid
# ---------------------------------------------------------------------------------------------


def test_shift_t_properties():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(flow.shift_t(t, 1.0), t, rtol=0, atol=0)
    for s in (0.3, 3.0):
        ts = flow.shift_t(t, s)
        assert ts[0] == 0 and ts[-1] == 1
        assert (ts.diff() > 0).all()
        torch.testing.assert_close(flow.shift_t(ts, 1 / s), t)  # shift s then 1/s is the identity
    assert (flow.shift_t(t[1:-1], 3.0) > t[1:-1]).all()
    assert (flow.shift_t(t[1:-1], 0.3) < t[1:-1]).all()
    with pytest.raises(ValueError):
        flow.shift_t(t, 0.0)


def test_shift_for_tokens():
    assert flow.shift_for_tokens(256) == 1.0
    assert flow.shift_for_tokens(1024, base_tokens=1024, base_shift=3.0) == 3.0
    assert flow.shift_for_tokens(1024) == pytest.approx(2.0)  # 4x tokens -> 2x shift
    shifts = [flow.shift_for_tokens(n) for n in (64, 256, 1024, 4096)]
    assert shifts == sorted(shifts) and len(set(shifts)) == 4


@pytest.mark.parametrize("steps, shift, sway", [(1, 1.0, None), (8, 1.0, None), (50, 3.0, None), (32, 1.0, -1.0), (32, 2.0, 1.5), (1000, 1.0, -1.0)])
def test_time_grid_shape_ends_monotone(steps, shift, sway):
    times = flow.time_grid(steps, shift=shift, sway=sway)
    assert times.shape == (steps + 1,) and times.dtype == torch.float32
    assert times[0].item() == 1.0 and times[-1].item() == 0.0
    assert (times.diff() < 0).all()


def test_time_grid_sway_formula():
    """s = -1 gives u' = 1 - cos(pi u / 2), t = cos(pi u / 2): small steps near noise, large near data."""
    steps = 16
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    times = flow.time_grid(steps, sway=-1.0)
    torch.testing.assert_close(times.double(), torch.cos(math.pi / 2 * u), rtol=0, atol=1e-7)
    dt = -times.diff()
    assert dt[0] < 1 / steps / 10 and dt[-1] > 1 / steps
    assert (dt.diff() > 0).all()
    plain = flow.time_grid(steps)
    torch.testing.assert_close(plain.double(), 1 - u, rtol=0, atol=1e-7)


def test_time_grid_shift_moves_towards_noise():
    plain, shifted = flow.time_grid(10), flow.time_grid(10, shift=3.0)
    assert (shifted[1:-1] > plain[1:-1]).all()
    torch.testing.assert_close(shifted, flow.shift_t(plain.double(), 3.0).float())


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(steps=-3), dict(steps=4, shift=0.0), dict(steps=4, sway=-1.5), dict(steps=4, sway=2.0)])
def test_time_grid_and_solvers_reject_bad_args(kwargs):
    steps = kwargs.pop("steps")
    with pytest.raises(ValueError):
        flow.time_grid(steps, **kwargs)
    with pytest.raises(ValueError):
        Euler(steps=steps, **kwargs)
    with pytest.raises(ValueError):
        Heun(steps=steps, **kwargs)


# ---------------------------------------------------------------------------------------------
# Solvers against the exact Gaussian flow
# ---------------------------------------------------------------------------------------------

MEAN, STD = 1.5, 0.5


def _gaussian_problem(n: int = 20_000):
    """x_0 ~ N(1.5, 0.5^2). The rectified-flow ODE between Gaussians keeps z = (x_t - (1-t) m) / sqrt(Var x_t)
    constant (Var x_1 = 1), so the exact map is affine: x_0 = m + std * x_1."""
    x_1 = torch.randn(n, generator=gen(9), dtype=torch.float64)
    return (lambda x, t: gaussian_velocity(x, t, MEAN, STD)), x_1, MEAN + STD * x_1


def _map_error(solver, steps: int) -> float:
    v_fn, x_1, exact = _gaussian_problem()
    return (solver(steps=steps)(v_fn, x_1) - exact).abs().max().item()


@pytest.mark.parametrize("solver, steps", [(Euler, 64), (Heun, 8)])  # Euler at 8 steps: std off by 0.085
def test_solver_reaches_gaussian(solver, steps):
    v_fn, x_1, exact = _gaussian_problem()
    x_0 = solver(steps=steps)(v_fn, x_1)
    assert abs(x_0.mean().item() - MEAN) < 0.03 and abs(x_0.std().item() - STD) < 0.03
    assert abs(x_0.mean().item() - exact.mean().item()) < 0.015 and abs(x_0.std().item() - exact.std().item()) < 0.015


def test_heun_beats_euler_at_equal_steps():
    for steps in (4, 8, 16):
        assert _map_error(Heun, steps) < 0.1 * _map_error(Euler, steps)


@pytest.mark.parametrize("solver, order", [(Euler, 1), (Heun, 2)])
def test_solver_convergence_order(solver, order):
    errors = [_map_error(solver, steps) for steps in (16, 32, 64, 128)]  # Heun is pre-asymptotic below 16
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - order) < 0.25 for r in rates), (errors, rates)


def test_solvers_call_v_fn_with_batched_t_and_count():
    calls: list[tuple[torch.Size, float]] = []

    def v_fn(x, t):
        calls.append((t.shape, t[0].item()))
        return torch.zeros_like(x)

    x_1 = torch.randn(3, 2, 4)
    torch.testing.assert_close(Euler(steps=5)(v_fn, x_1), x_1)
    assert len(calls) == 5 and all(shape == (3,) for shape, _ in calls)
    assert [t for _, t in calls] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    calls.clear()
    Heun(steps=5)(v_fn, x_1)
    assert len(calls) == 10 and calls[-1][1] == 0.0  # trapezoid on the last step too


def test_solver_dataclasses_use_the_shifted_swayed_grid():
    v_fn, x_1, _ = _gaussian_problem(100)
    times = flow.time_grid(6, shift=2.0, sway=-0.5)
    torch.testing.assert_close(Euler(6, 2.0, -0.5)(v_fn, x_1), flow.euler_sample(v_fn, x_1, times), rtol=0, atol=0)
    torch.testing.assert_close(Heun(6, 2.0, -0.5)(v_fn, x_1), flow.heun_sample(v_fn, x_1, times), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# CFG, loss, condition dropping
# ---------------------------------------------------------------------------------------------


def test_cfg_velocity():
    g = gen(10)
    c, u = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(flow.cfg_velocity(c, u, 1.0), c)
    torch.testing.assert_close(flow.cfg_velocity(c, u, 0.0), u)
    torch.testing.assert_close(flow.cfg_velocity(c, u, 4.0), u + 4.0 * (c - u))
    c2, u2 = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(flow.cfg_velocity(c + 2 * c2, u + 2 * u2, 3.0), flow.cfg_velocity(c, u, 3.0) + 2 * flow.cfg_velocity(c2, u2, 3.0))
    torch.testing.assert_close(flow.cfg_velocity(c * 2, c, 3.0), c + 3.0 * c)


def test_per_sample_mse_values():
    v = torch.randn(3, 4, 5, dtype=torch.float64)
    assert per_sample_mse(v, v, Layout()).mean().item() == 0.0
    assert per_sample_mse(v + 2.0, v, Layout()).mean().item() == pytest.approx(4.0)
    err = torch.zeros_like(v)
    err[0], err[1], err[2] = 1.0, 5.0, 3.0  # per-sample MSE 1, 25, 9
    torch.testing.assert_close(per_sample_mse(v + err, v, Layout()), torch.tensor([1.0, 25.0, 9.0], dtype=torch.float64))


def test_per_sample_mse_packed_equals_each_sample_alone():
    """Packed samples of different lengths: each sample's mean over its own tokens, as if it were alone."""
    g = gen(11)
    lengths = [5, 2]
    pred, target = torch.randn(1, 7, 3, generator=g, dtype=torch.float64), torch.randn(1, 7, 3, generator=g, dtype=torch.float64)
    loss = per_sample_mse(pred, target, Layout.packed([lengths]))
    alone = [((p - q) ** 2).mean() for p, q in zip(pred[0].split(lengths), target[0].split(lengths))]
    torch.testing.assert_close(loss, torch.stack(alone))


def test_drop_mask():
    m = flow.drop_mask(100_000, 0.3, generator=gen(12))
    assert m.dtype == torch.bool and m.shape == (100_000,)
    assert abs(m.double().mean().item() - 0.3) < 0.01
    assert not flow.drop_mask(10_000, 0.0, generator=gen(12)).any()
    assert flow.drop_mask(10_000, 1.0, generator=gen(12)).all()
    torch.testing.assert_close(flow.drop_mask(50, 0.5, generator=gen(1)), flow.drop_mask(50, 0.5, generator=gen(1)))
    with pytest.raises(ValueError):
        flow.drop_mask(4, 1.5)

