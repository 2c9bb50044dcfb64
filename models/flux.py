"""FLUX.1 transformer (dev and schnell), with the module names of BFL's checkpoints.

    img (B, L_img, 64) ─ img_in ─┐                     ┌─ img ─ final_layer ─ (B, L_img, 64)
    txt (B, L_txt, 4096) ─ txt_in ┴─ 19 double blocks ─┴─ [txt | img] ─ 38 single blocks
    vec = time_in(t) + guidance_in(g) + vector_in(clip pooled): modulates every block

Double blocks keep separate weights for text and image tokens and attend over the
joint sequence [txt | img]; single blocks run one weight set over it. Attention goes
through `attention.attend` with an optional Plan (dense without one). Positions are
float (t, h, w) ids turned into RoPE angles in float64, so positions may be scaled.

Names follow black-forest-labs/flux (src/flux/model.py, modules/layers.py); a BFL file
loads with no renaming. diffusers' names pass through models/keymaps.py.
"""

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from attention import attend
from models.lora import set_route


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int  # 16 latent channels x 2x2 patch
    out_channels: int
    vec_in_dim: int  # CLIP pooled size
    context_in_dim: int  # T5 hidden size
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int  # double blocks
    depth_single_blocks: int
    axes_dim: tuple[int, int, int]  # RoPE dims of (t, h, w); they sum to the head dim
    theta: float
    qkv_bias: bool
    guidance_embed: bool  # dev: True (distilled guidance), schnell: False
    t5_length: int  # T5 tokens the pipeline encodes: dev 512, schnell 256
    ntk_factor: float = 1.0  # RoPE base theta is multiplied by this (see rope_angles)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS = {
    "flux-dev": FluxConfig(
        in_channels=64,
        out_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        mlp_ratio=4.0,
        num_heads=24,
        depth=19,
        depth_single_blocks=38,
        axes_dim=(16, 56, 56),
        theta=10000.0,
        qkv_bias=True,
        guidance_embed=True,
        t5_length=512,
    ),
    "flux-schnell": FluxConfig(
        in_channels=64,
        out_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        mlp_ratio=4.0,
        num_heads=24,
        depth=19,
        depth_single_blocks=38,
        axes_dim=(16, 56, 56),
        theta=10000.0,
        qkv_bias=True,
        guidance_embed=False,
        t5_length=256,
    ),
    # CPU tests: head_dim 16 split 4 / 6 / 6, the same structure at 1/100000 the size;
    # its inputs fit the tiny AE (16 latent channels), tiny CLIP and tiny T5 (width 64)
    "tiny": FluxConfig(
        in_channels=64,
        out_channels=64,
        vec_in_dim=64,
        context_in_dim=64,
        hidden_size=32,
        mlp_ratio=4.0,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 6, 6),
        theta=10000.0,
        qkv_bias=True,
        guidance_embed=True,
        t5_length=16,
    ),
}


# ---------------------------------------------------------------------------------------
# embeddings: timesteps and RoPE
# ---------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal embedding of 1000·t, [cos | sin]: (B,) -> (B, dim) in fp32.

    1000·t is formed in t's own dtype, the sines in fp32. Both official code paths
    (BFL and diffusers) cast t to the model dtype first, so in bf16 the model sees 1000·t
    rounded to 8 significant bits (t = 0.75 -> 752); callers pass t in the model dtype
    to match them, as Flux.forward does."""
    half = dim // 2
    ft = torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=ft, device=t.device) / half)
    args = (1000 * t)[:, None].to(ft) * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(ids: torch.Tensor, axes_dim, theta: float, ntk_factor: float = 1.0):
    """RoPE angles of float positions: ids (B, L, n_axes) -> (B, L, head_dim / 2), float64.

    Axis a rotates head-dim pairs with ω_j = θ'^(−2j/d_a), θ' = θ·ntk_factor (the NTK
    factor multiplies the base, as diffusers' get_1d_rotary_pos_embed does); the axes'
    pairs are concatenated in head-dim order."""
    base = theta * ntk_factor
    angles = []
    for a, d in enumerate(axes_dim):
        exponent = torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d
        omega = 1.0 / base**exponent  # (d/2,)
        angles.append(ids[..., a].double()[..., None] * omega)  # (B, L, d/2)
    return torch.cat(angles, dim=-1)


def rope_tables(ids, axes_dim, theta, ntk_factor=1.0, dtype=torch.float32):
    """(cos, sin), each (B, 1, L, head_dim / 2) in dtype (fp32, or fp64 for an fp64
    model), broadcast over heads."""
    angles = rope_angles(ids, axes_dim, theta, ntk_factor)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


# ---------------------------------------------------------------------------------------
# elementwise work, fused on the GPU
# ---------------------------------------------------------------------------------------

# Norms, RoPE, modulation and gates each read and write the whole stream several times
# when run op by op; on CUDA they run as one compiled kernel each (the same arithmetic:
# fp32 inside, one rounding to the stream's dtype at the end). The CPU runs them eagerly.
FUSE_ON_GPU = True


def fused_on_gpu(fn):
    compiled = None

    @functools.wraps(fn)
    def run(x, *args):
        nonlocal compiled
        if not (FUSE_ON_GPU and x.is_cuda):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        # dtypes, strides and batch sizes each get a kernel; past the limit, fail loudly
        with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
            return compiled(x, *args)

    return run


@fused_on_gpu
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of (B, H, L, D) by the angles, in the
    tables' dtype (fp32 for bf16 / fp32 models)."""
    x0, x1 = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)  # each (B, H, L, D/2)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def apply_rope(x: torch.Tensor, pe) -> torch.Tensor:
    return rope(x, *pe)


@fused_on_gpu
def rms_norm(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (xf * rrms).to(x.dtype) * scale


@fused_on_gpu
def norm_shift_scale(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    """(1 + scale) · LayerNorm(x) + shift; LayerNorm without affine, eps 1e-6."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


@fused_on_gpu
def add_gated(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x + gate * f


# ---------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the last dim in fp32; the weight is called `scale` in BFL files."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.scale)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


def split_heads(qkv: torch.Tensor, num_heads: int):
    """(B, L, 3·H·D) -> q, k, v, each (B, H, L, D)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def attention(q, k, v, pe, plan=None):
    """RoPE, then the one attention function: (B, H, L, D) -> (B, L, H·D)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = attend(q, k, v, plan)  # (B, H, L, D)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Holds the weights of one stream; the joint attention runs in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: torch.Tensor  # (B, 1, dim)
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """vec -> one (double: two) sets of (shift, scale, gate)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        first = ModulationOut(*out[:3])
        return first, (ModulationOut(*out[3:]) if self.multiplier == 6 else None)


# A stream's tokens may fall in segments with different modulation vectors (UltraGen's
# `clean` guidance keeps its own timestep): `mods` is [(stop, ModulationOut), ...], the
# segments in order, the last stop the stream's length. One segment is plain FLUX.


def modulate(x, norm: nn.Module, mods):
    """(1 + scale) · norm(x) + shift, per segment (norm: LayerNorm, no affine, eps 1e-6)."""
    if len(mods) == 1:
        return norm_shift_scale(x, mods[0][1].shift, mods[0][1].scale)
    h = norm(x)
    return torch.cat(
        [(1 + m.scale) * h[:, a:b] + m.shift for a, (b, m) in zip(_starts(mods), mods)], dim=1
    )


def gated(x, f, mods):
    """x + gate · f, per segment."""
    if len(mods) == 1:
        return add_gated(x, mods[0][1].gate, f)
    return x + torch.cat([m.gate * f[:, a:b] for a, (b, m) in zip(_starts(mods), mods)], dim=1)


def _starts(mods):
    return [0] + [stop for stop, _ in mods[:-1]]


def _firsts(mods):
    return [(stop, pair[0]) for stop, pair in mods]


def _seconds(mods):
    return [(stop, pair[1]) for stop, pair in mods]


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
    )


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(dim * mlp_ratio)
        self.img_mod = Modulation(dim, double=True)
        self.img_norm1 = _layer_norm(dim)
        self.img_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.img_norm2 = _layer_norm(dim)
        self.img_mlp = _mlp(dim, mlp_hidden)
        self.txt_mod = Modulation(dim, double=True)
        self.txt_norm1 = _layer_norm(dim)
        self.txt_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.txt_norm2 = _layer_norm(dim)
        self.txt_mlp = _mlp(dim, mlp_hidden)

    def forward(self, img, txt, img_vecs, txt_vecs, pe, plan=None):
        """img_vecs / txt_vecs: [(stop, vec (B, dim)), ...] per stream (see modulate)."""
        img_mods = [(stop, self.img_mod(v)) for stop, v in img_vecs]
        txt_mods = [(stop, self.txt_mod(v)) for stop, v in txt_vecs]
        img_mod1, img_mod2 = _firsts(img_mods), _seconds(img_mods)
        txt_mod1, txt_mod2 = _firsts(txt_mods), _seconds(txt_mods)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, self.img_norm1, img_mod1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, self.txt_norm1, txt_mod1))
        q = torch.cat([txt_q, img_q], dim=2)  # (B, H, L_txt + L_img, D)
        k = torch.cat([txt_k, img_k], dim=2)
        v = torch.cat([txt_v, img_v], dim=2)
        attn = attention(q, k, v, pe, plan)  # (B, L, dim)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = gated(img, self.img_attn.proj(img_attn), img_mod1)
        img = gated(img, self.img_mlp(modulate(img, self.img_norm2, img_mod2)), img_mod2)
        txt = gated(txt, self.txt_attn.proj(txt_attn), txt_mod1)
        txt = gated(txt, self.txt_mlp(modulate(txt, self.txt_norm2, txt_mod2)), txt_mod2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One weight set over [txt | img]; linear1 makes q | k | v | mlp-in in one matmul,
    linear2 maps [attention out | gelu(mlp)] back."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, dim * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.pre_norm = _layer_norm(dim)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, double=False)

    def forward(self, x, vecs, pe, plan=None):
        mods = [(stop, self.modulation(v)[0]) for stop, v in vecs]
        qkv, mlp = self.linear1(modulate(x, self.pre_norm, mods)).split(
            [x.shape[-1] * 3, self.mlp_hidden], dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, plan)  # (B, L, dim)
        return gated(x, self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1)), mods)


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(dim)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vecs):
        mods = []
        for stop, vec in vecs:
            shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # (B, 1, dim)
            mods.append((stop, ModulationOut(shift, scale, None)))
        return self.linear(modulate(x, self.norm_final, mods))


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------


class Flux(nn.Module):
    gradient_checkpointing = False  # recompute each block in backward (train.py)

    def __init__(self, config: FluxConfig):
        super().__init__()
        c = config
        if sum(c.axes_dim) != c.head_dim:
            raise ValueError(f"axes_dim {c.axes_dim} must sum to the head dim {c.head_dim}")
        self.config = c
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        if c.guidance_embed:
            self.guidance_in = MLPEmbedder(256, c.hidden_size)
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias)
            for _ in range(c.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio)
            for _ in range(c.depth_single_blocks)
        )
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)

    def forward(
        self,
        img: torch.Tensor,  # (B, L_img, in_channels) packed latent: [guidance | detail]
        img_ids: torch.Tensor,  # (B, L_img, 3) float positions
        txt: torch.Tensor,  # (B, L_txt, context_in_dim) T5 states
        txt_ids: torch.Tensor,  # (B, L_txt, 3), zeros for FLUX
        timesteps: torch.Tensor,  # (B,) t in [0, 1], 1 = noise
        y: torch.Tensor,  # (B, vec_in_dim) CLIP pooled
        guidance: torch.Tensor | None = None,  # (B,) dev only
        plan=None,  # attention.Plan for [txt | img] in layout order; None: dense
        ntk_factor: float | None = None,  # None: config.ntk_factor
        n_guidance: int = 0,  # the first n_guidance image tokens are UltraGen guidance
        guidance_timesteps: torch.Tensor | None = None,  # (B,) `clean` mode: their own t
    ) -> torch.Tensor:
        """The velocity of every image token: (B, L_img, out_channels).

        With n_guidance > 0, the image stream starts with low-resolution guidance tokens:
        routed LoRAs (models/lora.py) act on those alone, and with guidance_timesteps they
        are modulated by their own timestep (UltraGen's `clean` mode; `renoise` passes
        none: the guidance latent is noised to the current t like the detail)."""
        c = self.config
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C), got {img.shape}, {txt.shape}")
        if not 0 <= n_guidance <= img.shape[1]:
            raise ValueError(f"n_guidance {n_guidance} outside 0..{img.shape[1]}")
        if c.guidance_embed and guidance is None:
            raise ValueError("this FLUX model is guidance-distilled (dev): pass guidance")
        n_txt, n_img = txt.shape[1], img.shape[1]
        vec = self.vector(timesteps, y, guidance, img.dtype)  # (B, dim)
        if guidance_timesteps is None or n_guidance == 0:
            img_vecs = [(n_img, vec)]
            all_vecs = [(n_txt + n_img, vec)]
        else:
            vec_g = self.vector(guidance_timesteps, y, guidance, img.dtype)
            img_vecs = [(n_guidance, vec_g), (n_img, vec)]
            all_vecs = [(n_txt, vec), (n_txt + n_guidance, vec_g), (n_txt + n_img, vec)]
        self.route_lora(n_txt, n_guidance)
        img, txt = self.img_in(img), self.txt_in(txt)

        ids = torch.cat([txt_ids, img_ids], dim=1)  # (B, L, 3)
        ntk = c.ntk_factor if ntk_factor is None else ntk_factor
        table_dtype = torch.promote_types(img.dtype, torch.float32)
        pe = rope_tables(ids, c.axes_dim, c.theta, ntk, table_dtype)
        layer = 0
        for block in self.double_blocks:
            args = (img, txt, img_vecs, [(n_txt, vec)], pe, _for_layer(plan, layer))
            img, txt = self.run_block(block, *args)
            layer += 1
        x = torch.cat([txt, img], dim=1)  # (B, L_txt + L_img, dim)
        for block in self.single_blocks:
            x = self.run_block(block, x, all_vecs, pe, _for_layer(plan, layer))
            layer += 1
        return self.final_layer(x[:, n_txt:], img_vecs)  # (B, L_img, out_channels)

    def run_block(self, block, *args):
        """block(*args); with gradient_checkpointing (the trainer sets it) and autograd on,
        its activations are recomputed in the backward pass instead of kept."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def vector(self, timesteps, y, guidance, dtype) -> torch.Tensor:
        """The modulation vector: time_in(t) + guidance_in(g) + vector_in(y): (B, dim)."""
        vec = self.time_in(timestep_embedding(timesteps.to(dtype)).to(dtype))
        if self.config.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype)).to(dtype))
        return vec + self.vector_in(y)

    def route_lora(self, n_txt: int, n_guidance: int):
        """Points routed LoRAs (models/lora.py) at the guidance tokens: the first
        n_guidance tokens of the double blocks' image stream, and the same tokens after
        the text in the single blocks' joint stream."""
        set_route(self, (0, n_guidance), (n_txt, n_txt + n_guidance))


def _for_layer(plan, i: int):
    return None if plan is None else plan.for_layer(i)


def preset(name: str, **overrides) -> FluxConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown FLUX preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------
# latent packing and position ids
# ---------------------------------------------------------------------------------------


def pack(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) -> (B, h·w, C·4): 2×2 patches, channel slowest."""
    B, C, H, W = latent.shape
    x = latent.reshape(B, C, H // 2, 2, W // 2, 2)  # (B, C, h, 2, w, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h·w, C·4) -> (B, C, 2h, 2w) for a latent of (height, width) = (2h, 2w)."""
    B, _, D = x.shape
    h, w = height // 2, width // 2
    x = x.reshape(B, h, w, D // 4, 2, 2)  # (B, h, w, C, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, height, width)


def image_ids(h: int, w: int, batch: int = 1, device=None) -> torch.Tensor:
    """Positions (0, row, col) of an h×w packed grid in raster order: (B, h·w, 3) float."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


def text_ids(length: int, batch: int = 1, device=None) -> torch.Tensor:
    return torch.zeros(batch, length, 3, device=device)


# ---------------------------------------------------------------------------------------
# UltraGen's joint sequence: [text | guidance | detail], image tokens in layout order
# ---------------------------------------------------------------------------------------


def _image_perm(layout) -> torch.Tensor:
    """Layout position (after the text) -> position in cat(guidance raster, detail raster)."""
    return layout.perm[layout.n_text :] - layout.n_text


def to_layout(layout, detail: torch.Tensor, guidance: torch.Tensor | None = None):
    """Packed tokens in raster order -> the image stream in layout order.

    detail (B, H·W, C) on layout.grid; guidance (B, Hg·Wg, C) on layout.guidance_grid
    -> (B, Lg + H·W, C): guidance windows, then detail windows, each window-first."""
    x = detail if guidance is None else torch.cat([guidance, detail], dim=1)
    if x.shape[1] != layout.n - layout.n_text:
        raise ValueError(
            f"layout holds {layout.n_guidance} guidance + {layout.n_detail} detail tokens, "
            f"got {0 if guidance is None else guidance.shape[1]} + {detail.shape[1]}"
        )
    return x.index_select(1, _image_perm(layout).to(x.device))


def from_layout(layout, img: torch.Tensor):
    """Inverse of to_layout: (B, Lg + Ld, C) -> (detail raster, guidance raster or None)."""
    x = torch.empty_like(img)
    x[:, _image_perm(layout).to(img.device)] = img
    n_g = layout.n_guidance
    return x[:, n_g:], (x[:, :n_g] if n_g else None)


def layout_ids(layout, batch: int = 1, device=None):
    """RoPE ids of the joint sequence: (txt_ids (B, L_txt, 3), img_ids (B, L_img, 3)).
    Image ids are the layout's float positions on the detail grid; guidance tokens sit at
    their scaled positions (layout.ratio, + (r - 1) / 2 with layout.centre)."""
    pos = layout.positions().to(device=device, dtype=torch.float32)  # (n, 3)
    txt_ids, img_ids = pos[: layout.n_text], pos[layout.n_text :]
    return txt_ids.expand(batch, -1, -1), img_ids.expand(batch, -1, -1)
