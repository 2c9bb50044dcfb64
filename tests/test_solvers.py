"""models/solvers.py on CPU in fp32: Wan2.1's sigma grids, timesteps, guidance and solvers
against diffusers' schedulers (the references), then properties that hold whatever the
references say (exactness on linear flows, the shift formula, accuracy on a curved flow),
then argument checks. With WAN_REPO set to a Wan2.1 checkout, also against the official
FlowUniPCMultistepScheduler itself."""

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from hypothesis import example, given, settings
from hypothesis import strategies as st

from models.solvers import (
    SOLVERS,
    UNIPC_SIGMA_MAX,
    Euler,
    UniPC,
    cfg,
    make_solver,
    shifted_grid,
    unipc_order,
    wan_sigmas,
    wan_timesteps,
)

GUIDE = 5.0
# one float32 ulp just below 1 is 2^-24, at 1 it is 2^-23: diffusers' Euler scheduler
# shifts in float32 arithmetic, ours in float64 then rounds, so they may differ by that
SIGMA_ULP = 2.0**-23
# ... and by 1000 times that in t = 1000 sigma, plus the rounding of t (ulp 2^-7 at 1000)
T_TOL = 1000 * SIGMA_ULP + 2.0**-7
# sigma_max of Wan's FlowUniPCMultistepScheduler(shift=1): 1 - 1/1000 through a float32
# tensor and .item() (written out here, not taken from the module under test)
OFFICIAL_SIGMA_MAX = torch.tensor(1 - 1 / 1000, dtype=torch.float32).item()


def official_unshifted(steps: int, solver: str) -> np.ndarray:
    """The unshifted grid Wan's text2video runs on, float64 (steps,): UniPC starts at the
    float32 sigma_max of FlowUniPCMultistepScheduler(shift=1), Euler at 1."""
    start = OFFICIAL_SIGMA_MAX if solver == "unipc" else 1.0
    return np.linspace(start, 0, steps + 1)[:-1]


def diffusers_scheduler(solver: str, steps: int, shift: float):
    """diffusers' equivalent of the official scheduler, given the official unshifted grid
    (each shifts it once; their own default grids differ: UniPC's starts at 1 - 1e-6 and
    ends above 0, Euler's default would shift twice)."""
    if solver == "unipc":
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=1000,
            flow_shift=shift,
        )
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=official_unshifted(steps, solver))
    return sched


# ---------------------------------------------------------------------------------------
# a toy velocity model: deterministic, nonlinear in x, depends on t and on the condition
# ---------------------------------------------------------------------------------------

_gen = torch.Generator().manual_seed(0)
W_IN = torch.randn(8, 4, generator=_gen) / 2  # (hidden, C)
W_OUT = torch.randn(4, 8, generator=_gen) / 3  # (C, hidden)
FREQ = torch.randn(8, generator=_gen) * 3  # (hidden,)
COND = torch.randn(8, generator=_gen)  # (hidden,) the "prompt"
UNCOND = torch.randn(8, generator=_gen)  # (hidden,) the negative prompt
NOISE = torch.randn(1, 4, 2, 3, 3, generator=_gen)  # (B, C, F, H, W) latent noise


def toy_velocity(x: torch.Tensor, t, c: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> same: x + W_out tanh(W_in x + sin(FREQ t / 1000) + c). The t
    term makes a timestep off by one visible (a relative change of ~3e-3)."""
    tt = torch.as_tensor(t).to(torch.float32) / 1000
    h = torch.einsum("oc,bc...->bo...", W_IN, x) + (torch.sin(FREQ * tt) + c).view(1, -1, 1, 1, 1)
    return x + torch.einsum("co,bo...->bc...", W_OUT, torch.tanh(h))


def ours(solver: str, steps: int, shift: float):
    """Our loop from NOISE with CFG: (final latent, the timesteps the model was given)."""
    x, seen = NOISE.clone(), []
    run = make_solver(solver, wan_sigmas(steps, shift, solver))
    for t in wan_timesteps(steps, shift, solver):
        seen.append(t)
        x = run.step(cfg(toy_velocity(x, t, COND), toy_velocity(x, t, UNCOND), GUIDE), x)
    return x, torch.stack(seen)


def reference(sched, step):
    """A reference loop as Wan's text2video writes it: step(v, t, x) -> next x."""
    x, seen = NOISE.clone(), []
    for t in sched.timesteps:
        seen.append(t)
        v_cond, v_uncond = toy_velocity(x, t, COND), toy_velocity(x, t, UNCOND)
        x = step(v_uncond + GUIDE * (v_cond - v_uncond), t, x)  # written out, not cfg()
    return x, torch.stack(seen)


def assert_latents_close(got, want):
    # fp32 tolerance: 1e-6 relative to the latent's scale (UniPC is bitwise equal in
    # practice; Euler differs by ~4e-7 relative, from the 1-ulp sigma differences)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


# ---------------------------------------------------------------------------------------
# 1. grids and timesteps against diffusers
# ---------------------------------------------------------------------------------------


# 37 steps at shift 1: 999 (1 - i/37) is an integer for 10 of the i, where sigma rounded
# to float32 first would truncate one lower than the official float64 grid does
@pytest.mark.parametrize("shift", [1, 3, 5, 8])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 37, 50])
def test_unipc_grid_equals_diffusers(steps, shift):
    ref = diffusers_scheduler("unipc", steps, shift)
    sigmas, ts = wan_sigmas(steps, shift, "unipc"), wan_timesteps(steps, shift, "unipc")
    # exact: the same float64 numbers truncated to int64, the same float64 -> float32 rounding
    assert ts.dtype == torch.int64 and torch.equal(ts, ref.timesteps)
    assert sigmas.dtype == torch.float32 and torch.equal(sigmas, ref.sigmas)


@pytest.mark.parametrize("shift", [1, 3, 5, 8])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
def test_euler_grid_equals_diffusers(steps, shift):
    ref = diffusers_scheduler("euler", steps, shift)
    sigmas, ts = wan_sigmas(steps, shift, "euler"), wan_timesteps(steps, shift, "euler")
    assert sigmas.dtype == ts.dtype == torch.float32
    # tolerance: one float32 ulp of sigma (diffusers shifts in float32), 1000 ulps in t
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=0, atol=SIGMA_ULP)
    torch.testing.assert_close(ts, ref.timesteps, rtol=0, atol=T_TOL)
    assert sigmas[0] == 1 and sigmas[-1] == 0  # exact: the shift keeps 1 and 0 fixed


def test_unipc_grid_starts_at_float32_sigma_max():
    # The official scheduler's sigma_max is float32(0.999) (exact values below, from
    # FlowUniPCMultistepScheduler.set_timesteps(3, shift=1)); a grid from the float64 0.999
    # truncates 665.999... to 665. diffusers given that grid shows the difference.
    assert UNIPC_SIGMA_MAX == OFFICIAL_SIGMA_MAX == 0.9990000128746033
    assert wan_timesteps(3, 1, "unipc").tolist() == [999, 666, 333]
    ref = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000
    )
    ref.set_timesteps(sigmas=np.linspace(0.999, 0, 4)[:-1])
    assert ref.timesteps.tolist() == [999, 665, 332]


# ---------------------------------------------------------------------------------------
# 2. whole denoising loops with CFG against diffusers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [3, 5])
@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("solver", SOLVERS)
def test_loop_equals_diffusers(solver, steps, shift):
    sched = diffusers_scheduler(solver, steps, shift)
    want, want_ts = reference(sched, lambda v, t, x: sched.step(v, t, x).prev_sample)
    got, got_ts = ours(solver, steps, shift)
    if solver == "unipc":
        assert torch.equal(got_ts, want_ts)  # exact: int64
    else:  # tolerance: as in the grid test (one float32 ulp of sigma, times 1000)
        torch.testing.assert_close(got_ts, want_ts, rtol=0, atol=T_TOL)
    assert_latents_close(got, want)


@pytest.mark.skipif("WAN_REPO" not in os.environ, reason="set WAN_REPO to a Wan2.1 checkout")
@pytest.mark.parametrize("steps, shift", [(1, 5), (3, 1), (9, 1), (20, 5), (50, 8)])
def test_unipc_equals_official_wan(steps, shift):
    path = Path(os.environ["WAN_REPO"]) / "wan" / "utils" / "fm_solvers_unipc.py"
    spec = importlib.util.spec_from_file_location("wan_fm_solvers_unipc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # as wan/text2video.py builds it
    sched = module.FlowUniPCMultistepScheduler(
        num_train_timesteps=1000, shift=1, use_dynamic_shifting=False
    )
    sched.set_timesteps(steps, shift=shift)
    assert torch.equal(wan_timesteps(steps, shift, "unipc"), sched.timesteps)  # exact
    assert torch.equal(wan_sigmas(steps, shift, "unipc"), sched.sigmas)  # exact
    want, want_ts = reference(sched, lambda v, t, x: sched.step(v, t, x, return_dict=False)[0])
    got, got_ts = ours("unipc", steps, shift)
    assert torch.equal(got_ts, want_ts)
    assert_latents_close(got, want)


# ---------------------------------------------------------------------------------------
# 3. properties
# ---------------------------------------------------------------------------------------


@given(
    solver=st.sampled_from(SOLVERS),
    steps=st.integers(1, 50),
    shift=st.floats(0.25, 16),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40)
def test_linear_flow_lands_on_x0(solver, steps, shift, seed):
    """With the constant velocity eps - x0 of a linear flow both solvers are exact: Euler
    trivially, UniPC because every x0 prediction is x0 (no divided differences)."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 1, 4, 2, 3, 3, generator=g)  # (B, C, F, H, W) each
    sigmas = wan_sigmas(steps, shift, solver)
    run = make_solver(solver, sigmas)
    x = (1 - sigmas[0]) * x0 + sigmas[0] * eps
    for _ in range(steps):
        x = run.step(eps - x0, x)
    # tolerance: fp32 rounding of <= 50 steps on values of |x| <~ 5 (measured <= 4e-6)
    torch.testing.assert_close(x, x0, rtol=0, atol=2e-5)


def test_unipc_is_second_order_on_a_curved_flow():
    """Data x0 ~ N(mu, s^2), eps ~ N(0, 1): the ideal velocity is linear in x with
    t-dependent coefficients, and the flow map is known: x_t = m_t + sd_t / sd_1 (x_1 - m_1)
    with m_t = (1 - t) mu, sd_t^2 = (1 - t)^2 s^2 + t^2. Measured errors at 10 / 20 steps
    (shift 1): Euler 0.106 / 0.055 (first order), UniPC 0.028 / 0.0037."""
    mu, s = 1.5, 0.3

    def sd(t):
        return ((1 - t) ** 2 * s * s + t * t) ** 0.5

    def velocity(x, t):  # E[eps - x0 | x_t = x], in float64
        t, x = t.double(), x.double()
        return (-mu + (t - (1 - t) * s * s) / sd(t) ** 2 * (x - (1 - t) * mu)).float()

    x1 = torch.linspace(-2, 2, 9).view(1, 9)  # (B, C) starting points
    err = {}
    for solver in SOLVERS:
        for steps in (10, 20):
            sigmas = wan_sigmas(steps, 1, solver)
            run, x = make_solver(solver, sigmas), x1.clone()
            for i in range(steps):
                x = run.step(velocity(x, sigmas[i]), x)
            exact = mu + s / sd(sigmas[0].double()) * (x1 - (1 - sigmas[0].double()) * mu)
            err[solver, steps] = (x - exact).abs().max().item()
    assert err["euler", 10] / err["euler", 20] == pytest.approx(2, rel=0.1)  # first order
    assert err["unipc", 10] / err["unipc", 20] > 4  # at least second order
    assert err["unipc", 20] < 0.1 * err["euler", 20]


@pytest.mark.parametrize("solver", SOLVERS)
def test_shift_reaches_the_grid(solver):
    steps = 10
    plain, shifted = wan_sigmas(steps, 1, solver), wan_sigmas(steps, 5, solver)
    start = UNIPC_SIGMA_MAX if solver == "unipc" else 1.0
    s64 = torch.from_numpy(np.linspace(start, 0, steps + 1))  # (steps + 1,) unshifted
    assert torch.equal(plain, s64.float())  # exact: shift 1 is the unshifted grid itself
    assert not torch.equal(plain, shifted)
    # tolerance: one float32 rounding of the float64 formula
    torch.testing.assert_close(
        shifted, (5 * s64 / (1 + 4 * s64)).float(), rtol=0, atol=SIGMA_ULP / 2
    )
    assert torch.equal(shifted_grid(steps, 5, solver), 5 * s64[:-1] / (1 + 4 * s64[:-1]))


@given(steps=st.integers(1, 200), shift=st.floats(0.1, 20))
@example(steps=37, shift=1.0)  # see test_unipc_grid_equals_diffusers
@settings(max_examples=100)
def test_unipc_timesteps_truncate_the_float64_grid(steps, shift):
    sigmas, ts = wan_sigmas(steps, shift, "unipc"), wan_timesteps(steps, shift, "unipc")
    grid = shifted_grid(steps, shift, "unipc")
    assert sigmas.shape == (steps + 1,) and ts.shape == (steps,) and sigmas[-1] == 0
    assert bool((sigmas[:-1] > sigmas[1:]).all()) and 0 < sigmas[0] < 1
    assert torch.equal(ts, torch.floor(grid * 1000).to(torch.int64))  # exact: a floor
    assert 0 <= ts.min() and ts.max() <= 999 and bool((ts[:-1] >= ts[1:]).all())


def test_unipc_orders():
    assert [unipc_order(i, 1) for i in range(1)] == [1]
    assert [unipc_order(i, 2) for i in range(2)] == [1, 1]
    assert [unipc_order(i, 5) for i in range(5)] == [1, 2, 2, 2, 1]


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_unipc_last_step_is_the_x0_prediction(steps):
    """The step to sigma = 0 returns x - sigma v of the sample the model saw (exactly:
    e^-h = 0 at h = inf), not of the corrected sample."""
    sigmas = wan_sigmas(steps, 5, "unipc")
    run, x = UniPC(sigmas), NOISE.clone()
    for i in range(steps):
        v = toy_velocity(x, sigmas[i] * 1000, COND)
        x, last = run.step(v, x), x - sigmas[i] * v
    assert torch.equal(x, last)


def test_cfg():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(cfg(c, u, 5.0), u + 5 * (c - u))  # exact: the same operations
    assert torch.equal(cfg(c, u, 5.0), torch.tensor([3.0, 14.0]))
    assert torch.equal(cfg(c, u, 0.0), u)
    assert cfg(c, None, 1.0) is c and cfg(c, u, 1) is c  # scale 1: the conditional alone
    with pytest.raises(ValueError, match="5.0"):
        cfg(c, None, 5.0)


# ---------------------------------------------------------------------------------------
# 4. arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4"])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be an int >= 1, got " + repr(steps)):
        wan_sigmas(steps, 5, "unipc")


@pytest.mark.parametrize("shift", [0, -1.0, math.nan, math.inf, None])
def test_bad_shift(shift):
    with pytest.raises(ValueError, match="shift must be .*" + repr(shift)):
        wan_timesteps(10, shift, "euler")


def test_bad_solver():
    for call in (
        lambda: wan_sigmas(10, 5, "dpm++"),
        lambda: wan_timesteps(10, 5, "dpm++"),
        lambda: make_solver("dpm++", wan_sigmas(10, 5, "unipc")),
    ):
        with pytest.raises(ValueError, match="unknown solver 'dpm\\+\\+'"):
            call()


def test_bad_sigmas_and_too_many_steps():
    with pytest.raises(ValueError, match="end at 0"):
        Euler(torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="decrease strictly"):
        Euler(torch.tensor([0.5, 0.7, 0.0]))
    with pytest.raises(ValueError, match="UniPC needs sigmas < 1, got first 1.0"):
        UniPC(wan_sigmas(4, 5, "euler"))
    run, x = UniPC(wan_sigmas(1, 5, "unipc")), NOISE
    run.step(x, x)
    with pytest.raises(ValueError, match="all 1 steps"):
        run.step(x, x)
