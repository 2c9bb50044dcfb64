"""Wan2.1 text-to-video transformer (1.3B and 14B), with the module names of the original
checkpoints.

    latent (B, 16, F, H, W) ─ patchify ─ tokens (B, L, 64) ─ patch_embedding ─┐
    context (B, ≤512, 4096) ─ zero-pad to text_len ─ text_embedding ─ ctx      │
    t (B,) or (B, L) ─ sinusoid ─ time_embedding ─ e ─ time_projection ─ e0    │
                                                                               ▼
    x ─ N blocks [ self-attn (RoPE) · cross-attn over ctx · FFN ] ─ head(e) ─ (B, L, 64)

Every block is modulated by its `modulation` table plus e0: (shift, scale, gate) for the
self-attention and for the FFN; the cross-attention has an affine LayerNorm (`norm3`)
and no modulation. The head takes (shift, scale) from `head.modulation` plus e.

Numerics follow the original (wan/modules/model.py): timesteps are raw (0..1000), their
sinusoid is computed in float64; modulation, norms, RoPE and the residual stream are fp32
(the original keeps the stream in fp32 under autocast; diffusers rounds it to the model
dtype after every sub-layer); every linear layer runs in its weights' dtype. RoPE angles
come from float (t, h, w) positions in float64, so positions may be scaled. Timesteps may
differ per token: the embeddings are computed once per distinct value and picked per
token inside the elementwise ops, never stored as (B, L, 6, dim).

Self-attention goes through `attention.attend` with an optional Plan (dense without
one); the cross-attention is plain SDPA over all text_len context rows, the zero padding
included (text_embedding maps the zero rows to a nonzero vector; Wan attends to them).

Names follow Wan-Video/Wan2.1 (`blocks.N.self_attn.q`, `blocks.N.modulation`,
`head.head`, ...): an original file loads with no renaming. diffusers' names pass through
models/keymaps.py (`wan_from_diffusers`).
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from attention import attend
from models.flux import fused_on_gpu, rms_norm, rope


@dataclass(frozen=True)
class WanConfig:
    patch_size: tuple[int, int, int]  # (t, h, w) latent cells per token
    in_dim: int  # latent channels
    out_dim: int
    dim: int
    ffn_dim: int
    freq_dim: int  # sinusoid size of the timestep embedding
    text_dim: int  # umT5 hidden size
    text_len: int  # context rows after zero padding
    num_heads: int
    num_layers: int
    theta: float  # RoPE base, per axis

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def axes_dim(self) -> tuple[int, int, int]:
        """RoPE dims of (t, h, w): d - 4⌊d/6⌋, 2⌊d/6⌋, 2⌊d/6⌋ (44 / 42 / 42 for d = 128)."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    @property
    def token_dim(self) -> int:
        """Channels of a patchified token: in_dim · pt · ph · pw (64)."""
        return self.in_dim * math.prod(self.patch_size)


PRESETS = {
    "wan-t2v-1.3b": WanConfig(
        patch_size=(1, 2, 2),
        in_dim=16,
        out_dim=16,
        dim=1536,
        ffn_dim=8960,
        freq_dim=256,
        text_dim=4096,
        text_len=512,
        num_heads=12,
        num_layers=30,
        theta=10000.0,
    ),
    "wan-t2v-14b": WanConfig(
        patch_size=(1, 2, 2),
        in_dim=16,
        out_dim=16,
        dim=5120,
        ffn_dim=13824,
        freq_dim=256,
        text_dim=4096,
        text_len=512,
        num_heads=40,
        num_layers=40,
        theta=10000.0,
    ),
    # CPU tests: head_dim 32 split 12 / 10 / 10; 16 latent channels as the real VAE, a
    # narrow text encoder (width 32) and 16 context rows
    "tiny": WanConfig(
        patch_size=(1, 2, 2),
        in_dim=16,
        out_dim=16,
        dim=64,
        ffn_dim=128,
        freq_dim=256,
        text_dim=32,
        text_len=16,
        num_heads=2,
        num_layers=2,
        theta=10000.0,
    ),
}


def preset(name: str, **overrides) -> WanConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown Wan preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def variant_of(config: WanConfig) -> str:
    """The name of the preset a config equals ("wan-t2v-1.3b", ...), else "custom"."""
    return next((name for name, c in PRESETS.items() if c == config), "custom")


# ---------------------------------------------------------------------------------------
# embeddings: timesteps and RoPE
# ---------------------------------------------------------------------------------------


def sinusoid(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Wan's timestep embedding of raw t (0..1000, no ×1000): (U,) -> (U, dim) float64,
    [cos | sin], frequencies 10000^(-j / (dim/2))."""
    half = dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double()[:, None] * freqs[None]  # (U, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(ids: torch.Tensor, axes_dim, theta: float) -> torch.Tensor:
    """RoPE angles of float positions: ids (B, L, 3) -> (B, L, head_dim / 2), float64.

    Axis a rotates adjacent head-dim pairs with ω_j = θ^(−2j/d_a); the axes' pairs are
    concatenated in head-dim order (t, h, w), as Wan's rope_params / rope_apply."""
    angles = []
    for a, d in enumerate(axes_dim):
        exponent = torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d
        omega = 1.0 / theta**exponent  # (d/2,)
        angles.append(ids[..., a].double()[..., None] * omega)  # (B, L, d/2)
    return torch.cat(angles, dim=-1)


def rope_tables(ids, axes_dim, theta, dtype=torch.float32):
    """(cos, sin), each (B, 1, L, head_dim / 2) in dtype, broadcast over heads."""
    angles = rope_angles(ids, axes_dim, theta)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def video_ids(f: int, h: int, w: int, batch: int = 1, device=None) -> torch.Tensor:
    """Positions (frame, row, col) of an f×h×w token grid in raster order: (B, f·h·w, 3)
    float, from 0 as Wan's."""
    ids = torch.zeros(f, h, w, 3, device=device)
    ids[..., 0] = torch.arange(f, device=device)[:, None, None]
    ids[..., 1] = torch.arange(h, device=device)[None, :, None]
    ids[..., 2] = torch.arange(w, device=device)[None, None, :]
    return ids.reshape(1, f * h * w, 3).expand(batch, -1, -1)


# ---------------------------------------------------------------------------------------
# patches: (pt, ph, pw, c) per token, c fastest (Wan's unpatchify order)
# ---------------------------------------------------------------------------------------


def patchify(latent: torch.Tensor, patch=(1, 2, 2)):
    """(B, C, F, H, W) -> tokens (B, f·h·w, pt·ph·pw·C) in raster order, grid (f, h, w)."""
    B, C, Fr, H, W = latent.shape
    pt, ph, pw = patch
    if Fr % pt or H % ph or W % pw:
        raise ValueError(f"latent {tuple(latent.shape)} does not divide into patches {patch}")
    f, h, w = Fr // pt, H // ph, W // pw
    x = latent.reshape(B, C, f, pt, h, ph, w, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, f, h, w, pt, ph, pw, C)
    return x.reshape(B, f * h * w, pt * ph * pw * C), (f, h, w)


def unpatchify(tokens: torch.Tensor, grid, patch=(1, 2, 2)) -> torch.Tensor:
    """Inverse of patchify: (B, f·h·w, pt·ph·pw·C) -> (B, C, f·pt, h·ph, w·pw)."""
    B, L, D = tokens.shape
    (f, h, w), (pt, ph, pw) = grid, patch
    if L != f * h * w:
        raise ValueError(f"{L} tokens do not fill the grid {tuple(grid)}")
    C = D // (pt * ph * pw)
    x = tokens.reshape(B, f, h, w, pt, ph, pw, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
    return x.reshape(B, C, f * pt, h * ph, w * pw)


# ---------------------------------------------------------------------------------------
# elementwise work with per-token modulation, fused on the GPU
# ---------------------------------------------------------------------------------------

# `mod` is a small table (U, n, dim) in fp32: a modulation parameter plus the embeddings
# of the U distinct timesteps of the call. `index` (B, 1) or (B, L) says which row each
# token uses; the rows are picked inside the (compiled) elementwise op.


@fused_on_gpu
def modulate(x: torch.Tensor, mod: torch.Tensor, index: torch.Tensor, k: int):
    """(1 + scale) · LayerNorm(x) + shift in fp32, (shift, scale) = mod[:, k], mod[:, k + 1]
    per token; LayerNorm without affine, eps 1e-6. x (B, L, dim) -> (B, L, dim)."""
    shift, scale = mod[:, k][index], mod[:, k + 1][index]  # each (B, L or 1, dim)
    h = F.layer_norm(x.to(mod.dtype), x.shape[-1:], eps=1e-6)
    return h * (1 + scale) + shift


@fused_on_gpu
def add_gated(x: torch.Tensor, f: torch.Tensor, mod: torch.Tensor, index, k: int):
    """x + f · gate in fp32, gate = mod[:, k] per token."""
    return x + f.to(mod.dtype) * mod[:, k][index]


def _to(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x in the dtype of the module's weights (each linear runs in its own dtype)."""
    return x.to(next(module.parameters()).dtype)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H·D) -> (B, H, L, D)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


# ---------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMS norm over the whole width (all heads together), eps 1e-6, fp32 inside."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim)
        self.norm_k = RMSNorm(dim)

    def forward(self, x, pe, plan=None):
        """x (B, L, dim) in the weights' dtype, pe = (cos, sin) -> (B, L, dim)."""
        q = _heads(self.norm_q(self.q(x)), self.num_heads)  # (B, H, L, D)
        k = _heads(self.norm_k(self.k(x)), self.num_heads)
        v = _heads(self.v(x), self.num_heads)
        q, k = rope(q, *pe).to(v.dtype), rope(k, *pe).to(v.dtype)
        out = attend(q, k, v, plan)  # (B, H, L, D)
        return self.o(out.transpose(1, 2).flatten(2))


class CrossAttention(SelfAttention):
    """Queries from the video tokens, keys and values from the embedded text; no RoPE,
    no mask: every context row (padding included) is attended."""

    def forward(self, x, context):
        q = _heads(self.norm_q(self.q(x)), self.num_heads)  # (B, H, L, D)
        k = _heads(self.norm_k(self.k(context)), self.num_heads)  # (B, H, text_len, D)
        v = _heads(self.v(context), self.num_heads)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.o(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int):
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)  # affine; before the cross-attention
        self.cross_attn = CrossAttention(dim, num_heads)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        # (shift, scale, gate) of the self-attention, then of the FFN
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, index, pe, context, plan=None):
        """x (B, L, dim) fp32 stream; e0 (U, 6, dim) fp32; index (B, 1) or (B, L)."""
        mod = self.modulation.to(e0.dtype) + e0  # (U, 6, dim)
        y = self.self_attn(_to(self.self_attn, modulate(x, mod, index, 0)), pe, plan)
        x = add_gated(x, y, mod, index, 2)
        x = x + self.cross_attn(_to(self.cross_attn, self.cross_norm(x)), context).to(x.dtype)
        y = self.ffn(_to(self.ffn, modulate(x, mod, index, 3)))
        return add_gated(x, y, mod, index, 5)

    def cross_norm(self, x):
        """norm3 in fp32 (weights upcast), as Wan's and diffusers' fp32 LayerNorms."""
        n = self.norm3
        return F.layer_norm(x, x.shape[-1:], n.weight.to(x.dtype), n.bias.to(x.dtype), n.eps)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.head = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)  # (shift, scale)

    def forward(self, x, e, index):
        """x (B, L, dim) fp32, e (U, dim) fp32 -> (B, L, out_dim)."""
        mod = self.modulation.to(e.dtype) + e[:, None]  # (U, 2, dim)
        return self.head(_to(self.head, modulate(x, mod, index, 0)))


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------


class Wan(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        c = config
        if c.dim % c.num_heads or c.head_dim % 2 or min(c.axes_dim) <= 0:
            raise ValueError(f"dim {c.dim} / {c.num_heads} heads: no even 3-axis RoPE split")
        self.config = c
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(
            Block(c.dim, c.ffn_dim, c.num_heads) for _ in range(c.num_layers)
        )
        self.head = Head(c.dim, c.out_dim * math.prod(c.patch_size))

    def forward(
        self,
        x: torch.Tensor,  # tokens (B, L, token_dim), or a latent video (B, in_dim, F, H, W)
        t: torch.Tensor,  # (B,) or (B, L) raw timesteps, 0..1000 (1000 = noise)
        context: torch.Tensor,  # (B, ≤ text_len, text_dim) umT5 states
        ids: torch.Tensor | None = None,  # (B, L, 3) or (L, 3) float (t, h, w); tokens only
        plan=None,  # attention.Plan for the self-attention, tokens in its order; None: dense
    ) -> torch.Tensor:
        """The velocity, in fp32 (as the original returns it).

        Tokens (the hierarchical methods' form: any tokens in any order, with their ids)
        -> (B, L, token_dim) in the same order. A latent video -> (B, out_dim, F, H, W);
        its tokens are the raster-order patches, ids = video_ids, and a per-token t is
        in that order."""
        c = self.config
        if x.ndim == 5:
            if ids is not None:
                raise ValueError("a latent video brings its own positions: pass ids=None")
            tokens, grid = patchify(x, c.patch_size)
            ids = video_ids(*grid, batch=x.shape[0], device=x.device)
            out = self.forward(tokens, t, context, ids, plan)
            return unpatchify(out, grid, c.patch_size)
        if x.ndim != 3 or x.shape[-1] != c.token_dim:
            raise ValueError(
                f"x must be (B, L, {c.token_dim}) tokens or a 5D latent, got {x.shape}"
            )
        if ids is None:
            raise ValueError("tokens need their positions: pass ids (B, L, 3)")
        B, L, _ = x.shape
        ids = ids.expand(B, -1, -1) if ids.ndim == 2 else ids
        if ids.shape != (B, L, 3):
            raise ValueError(f"ids must be (B, L, 3) = ({B}, {L}, 3), got {tuple(ids.shape)}")
        if t.shape not in ((B,), (B, L)):
            raise ValueError(f"t must be (B,) or (B, L) = ({B}, {L}), got {tuple(t.shape)}")

        stream = torch.promote_types(self.patch_embedding.weight.dtype, torch.float32)
        e, e0, index = self.time_tables(t, stream)
        ctx = self.embed_text(context)  # (B, text_len, dim)
        pe = rope_tables(ids, c.axes_dim, c.theta, stream)
        x = self.embed_tokens(x).to(stream)  # (B, L, dim)
        for i, block in enumerate(self.blocks):
            x = block(x, e0, index, pe, ctx, None if plan is None else plan.for_layer(i))
        return self.head(x, e, index).to(stream)  # (B, L, token_dim)

    def embed_tokens(self, x):
        """patch_embedding (a Conv3d with stride = kernel) as a linear over patchified
        tokens: the kernel (dim, C, pt, ph, pw) read in the tokens' (pt, ph, pw, C) order."""
        w = self.patch_embedding.weight.permute(0, 2, 3, 4, 1).flatten(1)  # (dim, token_dim)
        return F.linear(x.to(w.dtype), w, self.patch_embedding.bias)

    def embed_text(self, context):
        """Zero-pads the context to text_len rows, then text_embedding (the padding rows
        too, as Wan does): (B, L_txt, text_dim) -> (B, text_len, dim)."""
        n = self.config.text_len
        if context.ndim != 3 or context.shape[1] > n:
            raise ValueError(f"context must be (B, ≤{n}, text_dim), got {tuple(context.shape)}")
        context = F.pad(context, (0, 0, 0, n - context.shape[1]))
        return self.text_embedding(_to(self.text_embedding, context))

    def time_tables(self, t, dtype=torch.float32):
        """t (B,) or (B, L) -> e (U, dim), e0 (U, 6, dim) in dtype for the U distinct
        timesteps, and index (B, 1) or (B, L): which of them each token uses."""
        values, index = torch.unique(t, return_inverse=True)  # (U,), t's shape
        sin = sinusoid(values, self.config.freq_dim)  # (U, freq_dim) float64
        e = self.time_embedding(_to(self.time_embedding, sin))
        e0 = self.time_projection(_to(self.time_projection, e)).unflatten(1, (6, -1))
        return e.to(dtype), e0.to(dtype), index[:, None] if t.ndim == 1 else index
