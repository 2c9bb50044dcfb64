"""Plain Wan2.1 text-to-video: the sampling procedure, top to bottom in the order it runs.

    prompt, negative prompt -> umT5 (cut at 512 tokens, zero-padded)     encode_prompts
    noise (16, 1 + (F - 1)/4, H/8, W/8), fp32, from a CPU generator      noise
    for each of `steps` steps:                                           sample
        v = model(x, t, prompt); with guidance g != 1 also model(x, t, negative) and
        v = v_neg + g (v - v_neg)                       (classifier-free guidance)
        x = solver step (UniPC, as the official code, or Euler)
    -> latent; the caller decodes it with the VAE (tiles outer, time inner)

Defaults are the official code's (Wan-Video/Wan2.1 generate.py, wan/text2video.py,
wan/configs): 50 steps, shift 5, guidance 5, UniPC, 81 frames at 16 fps, Wan's negative
prompt; 832x480 for 1.3B (its only official size), 1280x720 for 14B. The schedules and
solvers are models/solvers.py. One difference: the noise comes from a CPU generator, so
a seed gives the same video on any device (the official code draws it on the GPU).
"""

import math
from dataclasses import dataclass

import torch

from models import solvers
from models.progress import quiet

# wan/configs/shared_config.py: sample_neg_prompt
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
FPS = 16  # wan_shared_cfg.sample_fps
PX_PER_LATENT = 8  # the VAE: 8x in space
FRAMES_PER_LATENT = 4  # and 4x in time after frame 0
PX_MULTIPLE = 16  # 8x VAE, then 2x2 patches

# (H, W) the official code accepts (wan/configs SUPPORTED_SIZES); the first is the default
OFFICIAL_SIZES = {
    "wan-t2v-1.3b": [(480, 832), (832, 480)],
    "wan-t2v-14b": [(720, 1280), (1280, 720), (480, 832), (832, 480)],
}


@dataclass
class Settings:
    size: tuple | None = None  # (H, W) px; None: the model's default
    frames: int = 81  # 1 + 4k
    steps: int = 50
    guidance: float = 5.0  # classifier-free guidance scale; 1 = the prompt alone
    shift: float = 5.0
    solver: str = "unipc"  # "unipc" (official) or "euler"
    negative_prompt: str = NEGATIVE_PROMPT


# ---------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------


def check_frames(frames: int) -> int:
    """Frame counts are 1 + 4k (the VAE codes frame 0, then 4 frames per latent frame)."""
    if frames < 1 or (frames - 1) % FRAMES_PER_LATENT:
        lo = max(1, 1 + (frames - 1) // FRAMES_PER_LATENT * FRAMES_PER_LATENT)
        hi = lo + FRAMES_PER_LATENT if frames > 1 else 5
        raise ValueError(f"frame counts are 1 + 4k; {frames} is not one (nearest: {lo} or {hi})")
    return frames


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    if h < PX_MULTIPLE or w < PX_MULTIPLE or h % PX_MULTIPLE or w % PX_MULTIPLE:
        raise ValueError(f"video sizes must be positive multiples of 16 px, got {w}x{h}")
    return h, w


def latent_shape(size: tuple[int, int], frames: int) -> tuple[int, int, int, int]:
    """(H, W) px and 1 + 4k frames -> the latent (16, 1 + k, H/8, W/8)."""
    h, w = check_size(size)
    f = 1 + (check_frames(frames) - 1) // FRAMES_PER_LATENT
    return 16, f, h // PX_PER_LATENT, w // PX_PER_LATENT


def tokens(size: tuple[int, int], frames: int) -> int:
    """Transformer tokens: latent frames x (H/16) x (W/16)."""
    _, f, lh, lw = latent_shape(size, frames)
    return f * (lh // 2) * (lw // 2)


def default_size(variant: str) -> tuple[int, int]:
    return OFFICIAL_SIZES.get(variant, OFFICIAL_SIZES["wan-t2v-1.3b"])[0]


def size_warning(variant: str, size: tuple[int, int]) -> str | None:
    """A warning when the official code does not accept this size for this model."""
    sizes = OFFICIAL_SIZES.get(variant)
    if sizes is None or tuple(size) in sizes:
        return None
    h, w = size
    names = ", ".join(f"{sw}x{sh}" for sh, sw in sizes)
    extra = " (720p runs, less stably)" if variant == "wan-t2v-1.3b" else ""
    return f"{w}x{h} is not a size the official code accepts for {variant} ({names}){extra}"


# ---------------------------------------------------------------------------------------
# 1. the prompts
# ---------------------------------------------------------------------------------------


def encode_prompts(umt5, tokenizer, prompt: str, negative: str, text_len: int):
    """umT5 states of the prompt and the negative prompt, each (1, text_len, dim): the
    tokens' rows, then zeros (Wan's text pipeline, models/umt5.py)."""
    from models.umt5 import encode_prompts as encode

    both = encode(tokenizer, umt5, [prompt, negative], length=text_len)  # (2, L, dim)
    return both[:1], both[1:]


def prompt_tokens(tokenizer, prompt: str) -> int:
    """How many tokens the prompt has before it is cut (to warn when it is cut)."""
    from models.umt5 import clean_text

    return tokenizer.count(clean_text(prompt))


# ---------------------------------------------------------------------------------------
# 2. noise
# ---------------------------------------------------------------------------------------


def noise(size, frames: int, seed: int) -> torch.Tensor:
    """(1, 16, 1 + (F - 1)/4, H/8, W/8) fp32 standard normal from a CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, *latent_shape(size, frames), generator=gen)


# ---------------------------------------------------------------------------------------
# 3. the denoising loop
# ---------------------------------------------------------------------------------------


def velocity(model, x: torch.Tensor, t, context, context_null, guidance: float):
    """The guided velocity at x (B, 16, F, h, w) fp32, model timestep t: v(prompt), or
    with guidance g != 1, v(negative) + g (v(prompt) - v(negative)), in fp32."""
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    v = model(x, tt, context).float()
    if guidance == 1.0:
        return v
    v_null = model(x, tt, context_null).float()
    return solvers.cfg(v, v_null, guidance)


def sample(model, context, context_null, x: torch.Tensor, s: Settings, progress=quiet):
    """Denoises x (the noise, (1, 16, F, h, w)) over `s.steps` steps -> (latent fp32, info)."""
    sigmas = solvers.wan_sigmas(s.steps, s.shift, s.solver)  # (steps + 1,), last 0
    timesteps = solvers.wan_timesteps(s.steps, s.shift, s.solver)  # what the model gets
    solver = solvers.make_solver(s.solver, sigmas)
    x = x.float()
    bar = progress(f"wan {s.solver} {s.steps} steps", s.steps, x.device)
    for t in timesteps.tolist():
        v = velocity(model, x, t, context, context_null, s.guidance)
        x = solver.step(v, x)
        bar.step()
    info = dict(
        steps=s.steps,
        solver=s.solver,
        shift=s.shift,
        guidance=s.guidance,
        first_timestep=float(timesteps[0]),
        seconds=round(bar.seconds, 2),
    )
    return x, info


# ---------------------------------------------------------------------------------------
# memory: will the sampling phase fit?
# ---------------------------------------------------------------------------------------

# Bytes of one no-grad forward per token and per model width (bf16 weights, fp32 residual
# stream, as Wan keeps it), on top of the weights: 108 measured for wan-t2v-1.3b at
# 832x480x81 on an H100 (bench/results/wan-parity.md: 8.3 GiB peak); 120 leaves room.
ACTIVATION_BYTES = 120.0


def peak_memory(transformer, vae, size, frames: int):
    """Peak device memory of the sampling phase (a sampling.MemoryEstimate): the
    transformer and VAE weights, one forward over the tokens, and the fp32 latents the
    loop keeps (x, two velocities, the solver's history: 8 latents). The VAE decode runs
    after the transformer is freed, in one tile's memory, and the text encoder before it
    loads: both peak lower."""
    from models.sampling import MemoryEstimate, weight_bytes

    activations = ACTIVATION_BYTES * tokens(size, frames) * transformer.config.dim
    latent = math.prod(latent_shape(size, frames)) * 4
    return MemoryEstimate(weight_bytes(transformer, vae), int(activations), 0, 8 * latent)
