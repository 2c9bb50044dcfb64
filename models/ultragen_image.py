"""UltraGen (image) on FLUX.1: the sampling procedure, top to bottom in the order it runs.

    prompt -> CLIP-L (pooled) and T5 (states)                          encode_prompt
    level 1, plain FLUX at the first size: noise -> Euler over the BFL   base_level
            schedule (dense attention, RoPE NTK 1, --shift)
    level 2.. UltraGen, each guided by the level before:                hierarchical_level
      warm start: the previous latent upsampled and sharpened, noised   warm_source,
            to t0 = the schedule's t at step `skip`; the first `skip`   sampling.warm_start
            steps are skipped
      joint sequence [text | guidance | detail]: guidance = the previous latent on the
            guidance grid (renoised to t every step, or clean at its own t = 0), RoPE
            positions scaled by the ratio; detail attends its window + a halo + the
            aligned guidance; RoPE NTK factor; static shift (dynamic shift off)
    -> the last latent (B, 16, H/8, W/8); the caller decodes it (AE, tiled)

Each level's result is the guidance of the next (1K -> 4K -> 8K ...). The time convention
and the small maths (schedules, Euler, warm start, layouts) live in models/sampling.py;
the command line, files and the memory check in sample.py. `sample` runs the whole
procedure; the level functions are public so that tests can drive one level alone.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attention import MaskRule, Plan
from models import sampling
from models.flux import from_layout, image_ids, layout_ids, pack, text_ids, to_layout, unpack
from models.progress import quiet

PAPER_SKIP = (10, 28)  # UltraGen skips 10 of 28 steps (supplement, Table 4)


@dataclass
class Settings:
    """Every choice of the procedure (the command line's options; see sample.py --help).
    None means "the model's default" until `resolve` fills it in."""

    levels: list = field(default_factory=lambda: [(1024, 1024), (4096, 4096)])  # (H, W) px
    steps: int | None = None  # schedule length of levels 2.. (dev 28, schnell 4)
    base_steps: int | None = None  # steps of level 1 (default: steps)
    skip: int | None = None  # warm start: steps skipped at levels 2.. (10 of 28)
    guidance_scale: float | None = 3.5  # FLUX.1-dev distilled guidance; None for schnell
    shift: object = None  # level 1: "dynamic" (dev), "off" (schnell) or a static s
    hi_shift: object = None  # levels 2..: 3.0 (dev: diffusers' static shift), "off"
    window: tuple = (16, 16)  # detail window, tokens
    ratio: object = 4  # guidance grid = token grid / ratio; "auto": size / previous size
    scope: str = "aligned"  # guidance seen by detail tokens: "aligned" or "all"
    margin: int = 1  # aligned scope: windows within this many of the aligned one
    neighbours: str = "halo"  # cross-window attention: "halo", "none" or "shift"
    halo: int = 1  # tokens
    guidance_mode: str = "renoise"  # "renoise": noised to t every step; "clean": t = 0
    guidance_sees_text: bool = True
    detail_sees_text: bool = True
    centre: bool = False  # guidance RoPE positions + (ratio - 1) / 2
    ntk: float = 10.0  # RoPE NTK factor at levels 2..
    backend: str = "auto"  # attention executor: auto, flex, reference, dense
    warm_space: str = "latent"  # "latent" or "pixel" (decode, upsample, encode)
    upsample: str = "bicubic"
    sharpen: float = 0.5  # unsharp mask amount
    sharpen_sigma: float = 1.0  # its Gaussian sigma, pixels of the lower level
    vae_tile: int = 64  # AE tiles, latent pixels
    vae_overlap: int = 16


def resolve(s: Settings, variant: str) -> None:
    """Fills the model-dependent defaults: dev / schnell steps 28 / 4, skip round(steps ·
    10 / 28), shift dynamic / off, hi_shift 3 / off; schnell takes no guidance scale."""
    dev = variant != "flux-schnell"
    if s.steps is None:
        s.steps = 28 if dev else 4
    if s.base_steps is None:
        s.base_steps = s.steps
    if s.skip is None:
        s.skip = round(s.steps * PAPER_SKIP[0] / PAPER_SKIP[1])
    if s.shift is None:
        s.shift = "dynamic" if dev else "off"
    if s.hi_shift is None:
        s.hi_shift = 3.0 if dev else "off"
    if not dev:
        s.guidance_scale = None
    sampling.check_skip(s.steps, s.skip)


def level_ratios(s: Settings) -> list[int]:
    """The guidance ratio of each level after the first (ValueError when "auto" finds no
    whole ratio)."""
    if s.ratio != "auto":
        return [s.ratio] * (len(s.levels) - 1)
    return [sampling.level_ratio(size, prev) for prev, size in zip(s.levels, s.levels[1:])]


def mask_rule(s: Settings) -> MaskRule:
    return MaskRule(
        scope=s.scope,
        margin=s.margin,
        neighbours=s.neighbours,
        halo=s.halo,
        guidance_sees_text=s.guidance_sees_text,
        detail_sees_text=s.detail_sees_text,
    )


def add_loras(transformer, loras, guidance_lora, log=lambda msg: None) -> None:
    """Community LoRAs [(path, scale)] merged first (into the base weights: every token),
    then the routed guidance LoRA (its own A, B on the guidance tokens only)."""
    from models import lora

    for path, scale in loras:
        names = lora.apply_lora(transformer, path, scale)
        log(f"lora      {path} at scale {scale:g}: {len(names)} weights changed")
    if guidance_lora:
        names = lora.load_lora(transformer, guidance_lora)
        log(f"guidance  LoRA {guidance_lora}: {len(names)} routed layers")


def peak_memory(models, n_text: int, s: Settings, ratios, dtype):
    """The largest level's estimated peak device memory: (sampling.MemoryEstimate, size)."""
    weights = sampling.weight_bytes(models.transformer, models.ae)
    worst = None
    for i, size in enumerate(s.levels):
        if i == 0:
            h, w = sampling.token_grid(size)
            n = n_text + h * w
        else:
            n = sampling.hierarchical_layout(size, n_text, s.window, ratios[i - 1]).n
        est = sampling.estimate_memory(
            weights=weights, n_tokens=n, hidden=models.transformer.config.hidden_size,
            dtype_bytes=torch.finfo(dtype).bits // 8, image=size, vae_tile=s.vae_tile,
            vae_scale=models.ae.config.ch / 128,
        )  # fmt: skip
        if worst is None or est.total > worst[0].total:
            worst = (est, size)
    return worst


# ---------------------------------------------------------------------------------------
# 1. the prompt
# ---------------------------------------------------------------------------------------


@dataclass
class Cond:
    txt: torch.Tensor  # (B, L_txt, context_in_dim) T5 states
    y: torch.Tensor  # (B, vec_in_dim) CLIP pooled
    guidance: torch.Tensor | None  # (B,) distilled guidance scale (dev), None (schnell)

    @property
    def n_text(self) -> int:
        return self.txt.shape[1]


def encode_prompt(models, prompt: str, device, dtype, guidance_scale) -> Cond:
    """CLIP-L pooled and T5 states of the prompt (both cut at their lengths, 77 / 512)."""
    clip_ids = models.clip_tokenizer(prompt).to(device)  # (1, 77)
    t5_ids = models.t5_tokenizer(prompt).to(device)  # (1, L_txt)
    y = models.clip(clip_ids).to(dtype)  # (1, vec_in_dim)
    txt = models.t5(t5_ids).to(dtype)  # (1, L_txt, context_in_dim)
    g = None if guidance_scale is None else torch.full((1,), guidance_scale, device=device)
    return Cond(txt, y, g)


def velocity(model, img, img_ids, txt_ids, cond: Cond, t: float, **kw) -> torch.Tensor:
    """The model's velocity for tokens img (B, L, 64) at time t, in fp32."""
    dtype = cond.txt.dtype
    B = img.shape[0]
    tt = torch.full((B,), t, device=img.device)
    out = model(img.to(dtype), img_ids, cond.txt, txt_ids, tt, cond.y, cond.guidance, **kw)
    return out.float()


# ---------------------------------------------------------------------------------------
# 2. level 1: plain FLUX
# ---------------------------------------------------------------------------------------


def base_level(model, cond: Cond, size, s: Settings, noise_gen, progress=quiet, label="level 1"):
    """Level 1, plain FLUX: noise -> (latent (B, 16, H/8, W/8) fp32, info)."""
    device = cond.txt.device
    lh, lw = sampling.latent_size(size)
    noise = torch.randn(1, 16, lh, lw, generator=noise_gen).to(device)  # (B, 16, lh, lw)
    x = pack(noise)  # (B, lh/2 · lw/2, 64), raster order
    img_ids = image_ids(lh // 2, lw // 2, 1, device)
    txt_ids = text_ids(cond.n_text, 1, device)
    ts = sampling.schedule(s.base_steps, s.shift, n_tokens=x.shape[1])
    bar = progress(label, s.base_steps, device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(model, x, img_ids, txt_ids, cond, t, ntk_factor=1.0)
        x = sampling.euler_step(x, v, t, t_next)
        bar.step()
    return unpack(x, lh, lw), dict(steps=s.base_steps, seconds=round(bar.seconds, 2))


# ---------------------------------------------------------------------------------------
# 3. levels 2..: UltraGen
# ---------------------------------------------------------------------------------------


def warm_source(prev: torch.Tensor, size, s: Settings, ae) -> torch.Tensor:
    """The sharpened upsample of the previous level, as a latent of the target size."""
    lat = sampling.latent_size(size)
    kw = dict(mode=s.upsample, amount=s.sharpen, sigma=s.sharpen_sigma)
    if s.warm_space == "latent":
        return sampling.sharpened_upsample(prev, lat, **kw)
    ae_dtype = next(ae.parameters()).dtype
    tile = dict(tile=s.vae_tile, overlap=s.vae_overlap)
    image = ae.decode_tiled(prev.to(ae_dtype), **tile).float()  # (B, 3, h, w)
    image = sampling.sharpened_upsample(image, size, **kw).clamp(-1, 1)
    return ae.encode_tiled(image.to(ae_dtype), **tile).float()  # (B, 16, H/8, W/8)


def hierarchical_level(
    model,
    ae,
    cond: Cond,
    prev: torch.Tensor,
    size,
    ratio: int,
    s: Settings,
    noise_gen,
    progress=quiet,
    label="level 2",
    log: Callable[[str], None] = lambda msg: None,
):
    """One UltraGen level: prev (B, 16, h, w) guides a (B, 16, H/8, W/8) latent.
    -> (latent fp32, info)."""
    device = cond.txt.device
    layout = sampling.hierarchical_layout(size, cond.n_text, s.window, ratio, s.centre)
    backend = sampling.pick_backend(s.backend, device, layout.n)
    plan = Plan(layout, mask_rule(s), backend=backend)

    # guidance: the previous latent on the guidance grid, packed (B, Lg, 64)
    hg, wg = layout.guidance_grid[1:]
    if tuple(prev.shape[-2:]) != (2 * hg, 2 * wg):
        ph, pw = (8 * n for n in prev.shape[-2:])
        log(f"guidance  the {pw}x{ph} result resized to {16 * wg}x{16 * hg} for ratio {ratio}")
    g0 = pack(sampling.resize(prev, (2 * hg, 2 * wg), s.upsample))  # (B, Lg, 64)

    # warm start at t0 = the schedule's t at step `skip`
    lh, lw = sampling.latent_size(size)
    ts = sampling.schedule(s.steps, s.hi_shift, n_tokens=layout.n_detail)
    t0 = ts[s.skip]
    eps = torch.randn(1, 16, lh, lw, generator=noise_gen).to(device)
    # renoise: one eps_g for every step, so the guidance moves along its own straight
    # path (1 - t) g0 + t eps_g, as in training
    eps_g = torch.randn(g0.shape, generator=noise_gen).to(device)
    x = pack(sampling.warm_start(warm_source(prev, size, s, ae), eps, t0))  # (B, Ld, 64)

    txt_ids, img_ids = layout_ids(layout, 1, device)
    clean = s.guidance_mode == "clean"
    g_t = torch.zeros(1, device=device) if clean else None
    run = ts[s.skip :]
    bar = progress(label, len(run) - 1, device)
    for t, t_next in zip(run[:-1], run[1:]):
        g = g0 if clean else sampling.noised(g0, eps_g, t)  # (B, Lg, 64)
        img = to_layout(layout, x, g)  # (B, Lg + Ld, 64), layout order
        v = velocity(
            model,
            img,
            img_ids,
            txt_ids,
            cond,
            t,
            plan=plan,
            ntk_factor=s.ntk,
            n_guidance=layout.n_guidance,
            guidance_timesteps=g_t,
        )
        v_detail, _ = from_layout(layout, v)  # (B, Ld, 64), raster order
        x = sampling.euler_step(x, v_detail, t, t_next)
        bar.step()
    info = dict(
        layout=layout.describe(),
        backend=backend,
        ratio=ratio,
        t0=round(t0, 6),
        steps=len(run) - 1,
        seconds=round(bar.seconds, 2),
    )
    return unpack(x, lh, lw), info


# ---------------------------------------------------------------------------------------
# 4. the whole procedure
# ---------------------------------------------------------------------------------------


def sample(models, cond: Cond, s: Settings, noise_gen, progress=quiet, log=lambda msg: None):
    """All levels in order -> (the last latent (1, 16, H/8, W/8) fp32, one info dict per
    level). noise_gen: a CPU torch.Generator (the same noise on any device)."""
    ratios = level_ratios(s)
    n = len(s.levels)
    h, w = s.levels[0]
    latent, info = base_level(
        models.transformer, cond, (h, w), s, noise_gen, progress, f"level 1/{n} {w}x{h} flux"
    )
    levels = [dict(size=[w, h], **info)]
    for i, (size, ratio) in enumerate(zip(s.levels[1:], ratios), start=2):
        h, w = size
        latent, info = hierarchical_level(
            models.transformer, models.ae, cond, latent, size, ratio, s, noise_gen,
            progress, f"level {i}/{n} {w}x{h} ultragen", log,
        )  # fmt: skip
        levels.append(dict(size=[w, h], **info))
    return latent, levels


def decode(ae, latent: torch.Tensor, s: Settings) -> torch.Tensor:
    """The AE's tiled decode of the last latent: (1, 3, H, W) in [-1, 1]."""
    ae_dtype = next(ae.parameters()).dtype
    return ae.decode_tiled(latent.to(ae_dtype), tile=s.vae_tile, overlap=s.vae_overlap)
