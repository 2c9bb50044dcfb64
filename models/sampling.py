"""Small pure functions of sampling: the time convention, FLUX schedules, Euler steps,
UltraGen's warm start, the hierarchical layout of a target size, and a memory estimate.

One time convention, shared with training:

    t = 1 is noise, t = 0 is data;   x_t = (1 - t) x0 + t eps;   the model predicts
    v = eps - x0, so dx/dt = v and an Euler step from t to t_next is x + (t_next - t) v.

Sizes: an image of H x W pixels has a FLUX latent of (16, H/8, W/8) and a token grid of
(H/16, W/16) (2x2 latent patches); H and W must be multiples of 16.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attention import Layout

PX_PER_TOKEN = 16  # 8x VAE, then 2x2 patches
PX_PER_LATENT = 8

# ---------------------------------------------------------------------------------------
# time convention and schedules
# ---------------------------------------------------------------------------------------


def noised(x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps (t a float or broadcastable tensor)."""
    return (1 - t) * x0 + t * eps


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step of dx/dt = v from t to t_next (t_next < t when sampling)."""
    return x + (t_next - t) * v


def linear_mu(n_tokens: int, x1=256, y1=0.5, x2=4096, y2=1.15) -> float:
    """BFL's time-shift mu: linear in the image token count through (256, 0.5) and
    (4096, 1.15) (flux/sampling.py get_lin_function); extrapolated past both ends."""
    m = (y2 - y1) / (x2 - x1)
    return m * n_tokens + (y1 - m * x1)


def time_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """BFL's time shift t' = e^mu / (e^mu + (1/t - 1)); keeps t = 0 and t = 1 fixed.
    mu = ln s is diffusers' static shift s·t / (1 + (s - 1)·t)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def static_shift(t: torch.Tensor, s: float) -> torch.Tensor:
    """time_shift with mu = ln s, written as diffusers does: s t / (1 + (s - 1) t)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return s * t / (1 + (s - 1) * t)


def parse_shift(value) -> str | float:
    """A shift setting: "off", "dynamic", or a static shift s > 0 (as a float)."""
    if value in ("off", "dynamic"):
        return value
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"shift must be 'off', 'dynamic' or a number, got {value!r}") from None
    if not s > 0:
        raise ValueError(f"a static shift must be > 0, got {s}")
    return s


def schedule(steps: int, shift="off", n_tokens: int | None = None) -> list[float]:
    """steps + 1 times from 1 to 0: t = linspace(1, 0, steps + 1), then shifted.

    shift "off": as is (schnell). "dynamic": BFL's shift with mu = linear_mu(n_tokens)
    (dev at native sizes). A number s: the static shift mu = ln s (what diffusers does for
    FLUX.1-dev when dynamic shifting is disabled: its scheduler config has shift 3.0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    shift = parse_shift(shift)
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift == "dynamic":
        if n_tokens is None:
            raise ValueError("the dynamic shift needs the image token count")
        t = time_shift(t, linear_mu(n_tokens))
    elif shift != "off":
        t = static_shift(t, shift)
    return t.tolist()


# ---------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) in pixels, both positive multiples of 16."""
    h, w = size
    if h < PX_PER_TOKEN or w < PX_PER_TOKEN or h % PX_PER_TOKEN or w % PX_PER_TOKEN:
        raise ValueError(f"image sizes must be positive multiples of 16 px, got {w}x{h}")
    return h, w


def latent_size(size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) px -> (H/8, W/8) latent pixels."""
    h, w = check_size(size)
    return h // PX_PER_LATENT, w // PX_PER_LATENT


def token_grid(size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) px -> (H/16, W/16) tokens."""
    h, w = check_size(size)
    return h // PX_PER_TOKEN, w // PX_PER_TOKEN


def hierarchical_layout(
    size: tuple[int, int], text: int, window=(16, 16), ratio=4, centre: bool = False
) -> Layout:
    """UltraGen's joint sequence for an (H, W) px target: [text | guidance | detail], the
    detail on the target's token grid cut into `window`-token windows, the guidance grid
    ceil(grid / ratio) (the low-resolution latent, packed)."""
    return Layout(
        grid=token_grid(size), window=tuple(window), text=text, ratio=ratio, centre=centre
    )


def level_ratio(size: tuple[int, int], prev: tuple[int, int]) -> int:
    """The guidance ratio that makes the previous level's tokens exactly the guidance
    grid: size / prev, the same integer on both axes."""
    (h, w), (ph, pw) = size, prev
    if h % ph or w % pw or h // ph != w // pw:
        raise ValueError(
            f"level {w}x{h} is not a whole multiple of the previous level {pw}x{ph} "
            "on both axes: give --ratio as a number"
        )
    return h // ph


# ---------------------------------------------------------------------------------------
# warm start: upsample, sharpen, noise to t0
# ---------------------------------------------------------------------------------------


def resize(z: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W). Shrinking averages areas whatever the mode."""
    if tuple(z.shape[-2:]) == tuple(size):
        return z
    if size[0] <= z.shape[-2] and size[1] <= z.shape[-1]:
        return F.interpolate(z, size=size, mode="area")
    kw = {} if mode == "nearest" else dict(align_corners=False)
    return F.interpolate(z, size=size, mode=mode, **kw)


def _gaussian(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()  # (2 radius + 1,)


def gaussian_blur(z: torch.Tensor, sigma: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with per-axis sigma, edges replicated."""
    B, C, H, W = z.shape
    x = z.reshape(B * C, 1, H, W)
    for axis, s in zip((2, 3), sigma):
        if s <= 0:
            continue
        k = _gaussian(s).to(z)
        r = (len(k) - 1) // 2
        if axis == 2:
            x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        else:
            x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return x.reshape(B, C, H, W)


def unsharp_mask(z: torch.Tensor, amount: float, sigma: tuple[float, float]) -> torch.Tensor:
    """z + amount · (z - blur(z)): boosts what the blur removes; amount 0 = identity."""
    if amount == 0:
        return z
    return z + amount * (z - gaussian_blur(z, sigma))


def sharpened_upsample(
    z: torch.Tensor, size: tuple[int, int], mode="bicubic", amount=0.5, sigma=1.0
) -> torch.Tensor:
    """Upsample (B, C, h, w) to size (H, W), then unsharp-mask it. sigma is in the input's
    pixels (one low-resolution pixel covers H/h output pixels), so the same setting
    sharpens the same image detail whatever the ratio."""
    up = resize(z, size, mode)
    scale = (size[0] / z.shape[-2], size[1] / z.shape[-1])
    return unsharp_mask(up, amount, (sigma * scale[0], sigma * scale[1]))


def warm_start(x0: torch.Tensor, noise: torch.Tensor, t0: float) -> torch.Tensor:
    """UltraGen's initial latent: x_t0 = (1 - t0) x0 + t0 eps with x0 the sharpened
    upsample of the low-resolution result; sampling then starts at t0."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ")
    return noised(x0, noise, t0)


def pick_backend(name: str, device, n_tokens: int) -> str:
    """The attention executor for "auto": flex on CUDA; on the CPU the dense reference up
    to 6144 tokens (exact and quick there), flex beyond."""
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "flex"
    return "reference" if n_tokens <= 6144 else "flex"


def check_skip(steps: int, skip: int) -> None:
    if not 0 <= skip < steps:
        raise ValueError(f"skip must be in 0..{steps - 1} for {steps} steps, got {skip}")


# ---------------------------------------------------------------------------------------
# memory: will one step fit?
# ---------------------------------------------------------------------------------------

# Activation bytes of one no-grad transformer step, per token and per hidden unit, in
# units of the model dtype's size. Measured on an H100 (flux-dev, bf16, random weights,
# peak minus weights): 21.1 for dense 1K and 2K and for the hierarchical flex path at
# 2K, 4K and 6K alike (a single block's input, linear1's 7 widths, GELU, [attention |
# GELU], fp32 RoPE temporaries, packed key copies). 24 leaves room for fragmentation.
ACTIVATION_WIDTHS = 24.0
# VAE decode of one tile, per output pixel of the tile and per dtype byte, for the FLUX
# AE (128 channels at full resolution): measured 1213 (64-latent tiles, bf16, H100).
VAE_BYTES_PER_PIXEL = 1300.0


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes of the models on the device
    activations: int  # one transformer step at the level's token count
    vae: int  # one decoder tile + the decoded image
    latents: int  # the sampling state: latents, noise, velocity (fp32)

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.vae + self.latents

    def describe(self) -> str:
        gib = 1 << 30
        return (
            f"{self.total / gib:.1f} GiB = weights {self.weights / gib:.1f} + one step "
            f"{self.activations / gib:.1f} + VAE tile {self.vae / gib:.1f} + latents "
            f"{self.latents / gib:.2f}"
        )


def estimate_memory(
    *,
    weights: int,
    n_tokens: int,
    hidden: int,
    dtype_bytes: int,
    image: tuple[int, int],
    vae_tile: int = 64,
    vae_scale: float = 1.0,
) -> MemoryEstimate:
    """Peak device memory of a level: weights + one transformer step over n_tokens
    (text + guidance + detail) + one VAE decoder tile of vae_tile latent pixels + the
    fp32 latents. vae_scale: the AE's width relative to FLUX's (1 for the real AE)."""
    h, w = image
    acts = ACTIVATION_WIDTHS * n_tokens * hidden * dtype_bytes
    tile_px = min(vae_tile * PX_PER_LATENT, h) * min(vae_tile * PX_PER_LATENT, w)
    image_bytes = 3 * h * w * (4 + dtype_bytes)  # the fp32 blend and its cast
    vae = VAE_BYTES_PER_PIXEL * vae_scale * dtype_bytes * tile_px + image_bytes
    latent = 16 * (h // PX_PER_LATENT) * (w // PX_PER_LATENT) * 4
    return MemoryEstimate(int(weights), int(acts), int(vae), 8 * latent)


def weight_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of modules (None skipped)."""
    return sum(
        t.numel() * t.element_size()
        for m in modules
        if m is not None
        for t in [*m.parameters(), *m.buffers()]
    )


def device_memory(device) -> int:
    """Bytes a CUDA device has for this process: free + what its allocator holds."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def memory_problem(estimate: MemoryEstimate, available: int, what: str = "") -> str | None:
    """None when the estimate fits in `available` bytes, else a message saying by how much
    it does not."""
    if estimate.total <= available:
        return None
    gib = 1 << 30
    return (
        f"{what}needs about {estimate.describe()}, but the device has "
        f"{available / gib:.1f} GiB for this process"
    )
