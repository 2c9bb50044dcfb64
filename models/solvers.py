"""Sampling of plain Wan2.1 text-to-video: the sigma grids, the timesteps the model is
given, classifier-free guidance, and the two solvers (the official multistep UniPC-bh2
and the flow-matching Euler step).

Time convention (models/sampling.py), with sigma in the role of t:

    sigma = 1 is noise, sigma = 0 is data;   x_sigma = (1 - sigma) x0 + sigma eps;
    the model predicts the flow v = eps - x0, so its x0 prediction is x0 = x - sigma v.

A sampling loop, whatever the solver:

    sigmas = wan_sigmas(steps, shift, name)          # (steps + 1,) float32, last 0
    timesteps = wan_timesteps(steps, shift, name)    # (steps,) what the model is given
    solver = make_solver(name, sigmas)
    for t in timesteps:
        v = cfg(model(x, t, cond), model(x, t, uncond), guide)
        x = solver.step(v, x)                        # x at the next sigma

"unipc" is what Wan2.1's text2video.py does by default (FlowUniPCMultistepScheduler,
wan/utils/fm_solvers_unipc.py); "euler" is the plain flow-matching Euler loop of
UltraGen's and AtlasVid's video sampling. tests/test_solvers.py runs both against
diffusers' schedulers in fp32: UniPC matches bitwise (and the official scheduler too),
Euler to within the one-ulp differences of diffusers' float32 shift.
"""

import math
import numbers
from typing import Protocol

import numpy as np
import torch

from models.sampling import euler_step, static_shift

NUM_TRAIN_TIMESTEPS = 1000
SOLVERS = ("unipc", "euler")

# The official UniPC grid starts at the sigma_max of FlowUniPCMultistepScheduler(shift=1).
# Its training sigmas 1 - linspace(1, 1/1000, 1000)[::-1] pass through a float32 tensor
# before .item(), so sigma_max = float32(0.999) = 0.99900001287..., not 0.999. It matters:
# with 3 steps and shift 1 the official timesteps are [999, 666, 333], while a grid from
# 0.999 gives 0.666 * 1000 = 665.99999... and truncates to 665.
UNIPC_SIGMA_MAX = float(np.float32(1 - 1 / NUM_TRAIN_TIMESTEPS))

# ---------------------------------------------------------------------------------------
# grids and timesteps
# ---------------------------------------------------------------------------------------


def check_solver(name: str) -> str:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: expected one of {', '.join(SOLVERS)}")
    return name


def check_grid_args(steps: int, shift: float, solver: str) -> None:
    """steps an int >= 1, shift a finite number > 0, solver "unipc" or "euler"."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real):
        raise ValueError(f"shift must be a number > 0, got {shift!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    check_solver(solver)


def shifted_grid(steps: int, shift: float, solver: str) -> torch.Tensor:
    """The steps sigmas a run visits, in float64, before they are rounded: (steps,).

    The unshifted grid is numpy's linspace(start, 0, steps + 1) without its final 0, with
    start = UNIPC_SIGMA_MAX for "unipc" (as the official scheduler) and 1 for "euler".
    The shift then maps each sigma to s sigma / (1 + (s - 1) sigma): it keeps 0 and 1
    fixed and, for s > 1, spends more steps at high noise (shift s is a time shift of
    mu = ln s, models.sampling.static_shift). numpy's linspace, not torch's: they round
    differently, and the truncated timesteps must be the official ones."""
    check_grid_args(steps, shift, solver)
    start = UNIPC_SIGMA_MAX if solver == "unipc" else 1.0
    grid = np.linspace(start, 0.0, steps + 1)[:-1]  # (steps,) float64
    return static_shift(torch.from_numpy(grid), float(shift))


def wan_sigmas(steps: int, shift: float, solver: str) -> torch.Tensor:
    """The solver's sigma grid: (steps + 1,) float32, from near 1 down to a final 0.

    shifted_grid rounded to float32 with the 0 appended, as both references do
    (numpy float64 -> float32 for UniPC; diffusers' Euler shifts in float32 arithmetic,
    which can differ from this correctly rounded grid by one float32 ulp)."""
    grid = shifted_grid(steps, shift, solver)
    return torch.cat([grid, grid.new_zeros(1)]).to(torch.float32)


def wan_timesteps(steps: int, shift: float, solver: str) -> torch.Tensor:
    """What the model is given at each step: (steps,).

    "unipc": int64, sigma * 1000 truncated toward 0, computed from the float64 grid
    exactly as the official scheduler does (so from the same arguments as wan_sigmas,
    not from its float32 values: rounding sigma to float32 first can move it across an
    integer). "euler": float32 sigma * 1000 from the float32 grid, as diffusers'
    FlowMatchEulerDiscreteScheduler hands them out."""
    if check_solver(solver) == "unipc":
        return (shifted_grid(steps, shift, solver) * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    return wan_sigmas(steps, shift, solver)[:-1] * NUM_TRAIN_TIMESTEPS


# ---------------------------------------------------------------------------------------
# guidance
# ---------------------------------------------------------------------------------------


def cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_uncond + scale (v_cond - v_uncond).

    It moves from the unconditional prediction towards, and for scale > 1 past, the
    conditional one; computed in this order as Wan's text2video does, so the result is
    bitwise the same. scale 1 means the conditional prediction alone: v_cond is returned
    as is (the formula would give it up to one rounding) and v_uncond may be None, so a
    caller can skip the unconditional forward pass."""
    if scale == 1:
        return v_cond
    if v_uncond is None:
        raise ValueError(f"guidance scale {scale} needs the unconditional prediction")
    return v_uncond + scale * (v_cond - v_uncond)


# ---------------------------------------------------------------------------------------
# solvers
# ---------------------------------------------------------------------------------------


class Solver(Protocol):
    """One object per sampling run: step(v, x) is called once per grid step, in order,
    with the (guided) velocity v at the current sigma, and returns x at the next one."""

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


def check_sigmas(sigmas) -> torch.Tensor:
    """A solver's grid: a 1-D float tensor of >= 2 sigmas in [0, 1], strictly decreasing,
    ending at 0 (the data)."""
    s = torch.as_tensor(sigmas)
    if s.ndim != 1 or len(s) < 2 or not s.is_floating_point():
        raise ValueError(f"sigmas must be a 1-D float tensor of >= 2 values, got {s!r}")
    if s[-1] != 0:
        raise ValueError(f"sigmas must end at 0, got last {s[-1].item()}")
    if not bool((s[:-1] > s[1:]).all()) or s[0] > 1:
        raise ValueError(f"sigmas must decrease strictly from <= 1, got {s.tolist()}")
    return s


class _Grid:
    """A grid walked one step per call: next_step() -> (i, sigma_i, sigma_{i+1}), the
    sigmas as 0-dim tensors of the grid's dtype."""

    def __init__(self, sigmas):
        self.sigmas = check_sigmas(sigmas)
        self.steps = len(self.sigmas) - 1
        self.index = 0

    def next_step(self):
        i = self.index
        if i >= self.steps:
            raise ValueError(f"all {self.steps} steps of the grid are done")
        self.index += 1
        return i, self.sigmas[i], self.sigmas[i + 1]


class Euler(_Grid):
    """Flow-matching Euler: x_next = x + (sigma_next - sigma) v, the step size computed in
    the grid's float32 (as diffusers' FlowMatchEulerDiscreteScheduler does). Exact for a
    linear flow, whose velocity eps - x0 is constant along the path."""

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _, sigma, sigma_next = self.next_step()
        return euler_step(x, v, sigma, sigma_next)


# UniPC (Zhao et al. 2023), multistep, data prediction, B(h) = e^-h - 1 ("bh2"), order 2.
#
# With alpha = 1 - sigma and lambda = log(alpha / sigma) (half the log-SNR, rising from
# about -6.9 at sigma = 0.999 to +inf at sigma = 0), the flow ODE written through the x0
# prediction m = x - sigma v has the exact solution (as in DPM-Solver++)
#
#     x_t = (sigma_t / sigma_s) x_s + sigma_t  int_{lambda_s}^{lambda_t} e^lambda m dlambda.
#
# With h = lambda_t - lambda_s and m held at m(s) this is the first-order step
#
#     x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) m(s),
#
# which on the flow path is x_t = alpha_t m + sigma_t eps_hat (with eps_hat the noise
# that m implies): exact when m is constant, i.e. for a linear flow. Higher orders add
# - alpha_t B(h) sum_k rho_k D_k with divided differences D_k = (m(s_k) - m(s)) / r_k of
# earlier predictions, r_k = (lambda_{s_k} - lambda_s) / h. The predictor UniP-2 takes
# rho = 1/2; the corrector UniC-p redoes the step just taken once the model has been
# evaluated at its result, adding D_t = m(t) - m(s) (r = 1) and solving the order
# conditions R rho = b, R[k, j] = r_j^k, b_k = (k+1)! psi_{k+2}(-h) / B(h) with
# psi_1(z) = e^z - 1, psi_{k+1}(z) = psi_k(z) / z - 1 / k! (psi_k(z) = z phi_k(z)); for
# order 1 the official code takes rho = 1/2 instead of b_0.
#
# All of it in 0-dim float32 tensors, with the operations grouped as in the official code.


def log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha) - log(sigma) with alpha = 1 - sigma; +inf at sigma = 0."""
    return torch.log(1 - sigma) - torch.log(sigma)


def unipc_order(i: int, steps: int) -> int:
    """The order of step i of steps: 1 at the first (no history yet: the warm-up) and at
    the last (lower_order_final: the step to sigma = 0 has h = inf, where only the
    first-order update is finite), else 2."""
    return 1 if i == 0 or i == steps - 1 else 2


def unipc_b(hh: torch.Tensor, order: int) -> torch.Tensor:
    """The right-hand side of UniPC's order conditions for bh2: (order,) with
    b_k = (k+1)! psi_{k+2}(hh) / B(h), hh = -h, B(h) = psi_1(hh) = e^hh - 1."""
    b_h = torch.expm1(hh)
    psi = b_h / hh - 1  # psi_2
    b, factorial = [], 1
    for k in range(1, order + 1):
        b.append(psi * factorial / b_h)
        factorial *= k + 1
        psi = psi / hh - 1 / factorial  # psi_{k+2}
    return torch.stack(b)


def _divided_difference(m1, m0, sigma_s1, lambda_s0, h):
    """D_1 = (m1 - m0) / r_1, r_1 = (lambda_{s1} - lambda_{s0}) / h (r_1 < 0: s1 is the
    step before s0). Returns (D_1, r_1)."""
    r1 = (log_snr(sigma_s1) - lambda_s0) / h
    return (m1 - m0) / r1, r1


def unipc_predict(x, m0, m1, sigma_s1, sigma_s0, sigma_t, order: int) -> torch.Tensor:
    """UniP-order: x at sigma_s0 -> x at sigma_t (< sigma_s0), with m0 the x0 prediction at
    sigma_s0 and, for order 2, m1 the one at the step before (sigma_s1). At sigma_t = 0
    (h = inf, e^-h = 0) order 1 returns m0 itself: the last step lands on the model's
    x0 prediction."""
    alpha_t = 1 - sigma_t
    lambda_s0 = log_snr(sigma_s0)
    h = log_snr(sigma_t) - lambda_s0
    b_h = torch.expm1(-h)  # B(h) = e^-h - 1 (= h phi_1(-h))
    x_t = sigma_t / sigma_s0 * x - alpha_t * b_h * m0
    if order == 1:
        return x_t.to(x.dtype)
    d1, _ = _divided_difference(m1, m0, sigma_s1, lambda_s0, h)
    return (x_t - alpha_t * b_h * (0.5 * d1)).to(x.dtype)


def unipc_correct(x, m_t, m0, m1, sigma_s1, sigma_s0, sigma_t, order: int) -> torch.Tensor:
    """UniC-order: redo the step sigma_s0 -> sigma_t that the predictor took from x, now
    with m_t, the x0 prediction of the model evaluated at the predicted sample. m0 (and
    m1 for order 2) as in unipc_predict; order is the predictor's order of that step."""
    alpha_t = 1 - sigma_t
    lambda_s0 = log_snr(sigma_s0)
    h = log_snr(sigma_t) - lambda_s0
    b_h = torch.expm1(-h)
    x_t = sigma_t / sigma_s0 * x - alpha_t * b_h * m0
    d_t = m_t - m0
    if order == 1:
        return (x_t - alpha_t * b_h * (0.5 * d_t)).to(x.dtype)
    d1, r1 = _divided_difference(m1, m0, sigma_s1, lambda_s0, h)
    rks = torch.stack([r1, torch.ones_like(r1)])  # (2,): r_1, r_t = 1
    R = torch.stack([rks**0, rks**1])  # (2, 2): R[k, j] = r_j^k
    rho = torch.linalg.solve(R, unipc_b(-h, 2)).to(x.dtype)  # (2,)
    return (x_t - alpha_t * b_h * (rho[0] * d1 + rho[1] * d_t)).to(x.dtype)


class UniPC(_Grid):
    """Wan2.1's default sampler: multistep UniPC-bh2 of order 2 on the x0 prediction,
    lower order at the first and last steps, the corrector at every step after the
    first, a grid ending at 0 (FlowUniPCMultistepScheduler's defaults).

    step(v, x) at step i, with m_i = x - sigma_i v (from x as given, before correction):
      1. i > 0: correct x, the predictor's result, by UniC of the previous step's order,
         from the sample that step started at, with m_i (the model is not run again);
      2. predict the sample at sigma_{i+1} from the corrected x by UniP of order
         unipc_order(i, steps), using m_i and m_{i-1}.
    The sigmas must lie below 1 (lambda is -inf at sigma = 1)."""

    def __init__(self, sigmas):
        super().__init__(sigmas)
        if not self.sigmas[0] < 1:
            raise ValueError(f"UniPC needs sigmas < 1, got first {self.sigmas[0].item()}")
        self.m = []  # the x0 predictions of the last two steps, oldest first
        self.last = None  # (sample the last predictor started from, its order)

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i, sigma, sigma_next = self.next_step()
        s = self.sigmas
        m_i = x - sigma * v  # (B, C, ...) x0 prediction, from the uncorrected sample
        if self.last is not None:
            x_prev, order = self.last
            m1 = self.m[-2] if order == 2 else None
            sigma_s1 = s[i - 2] if order == 2 else None
            x = unipc_correct(x_prev, m_i, self.m[-1], m1, sigma_s1, s[i - 1], sigma, order)
        self.m = [*self.m[-1:], m_i]
        order = unipc_order(i, self.steps)
        self.last = (x, order)
        m1 = self.m[-2] if order == 2 else None
        sigma_s1 = s[i - 1] if order == 2 else None
        return unipc_predict(x, m_i, m1, sigma_s1, sigma, sigma_next, order)


def make_solver(name: str, sigmas: torch.Tensor) -> Solver:
    """A fresh solver for one run over sigmas (wan_sigmas): "unipc" or "euler"."""
    return UniPC(sigmas) if check_solver(name) == "unipc" else Euler(sigmas)
