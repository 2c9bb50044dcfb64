"""T5 v1.1 encoder (FLUX's `text_encoder_2`, T5-v1.1-XXL): its last hidden state is FLUX's
text sequence.

Module names are transformers' T5EncoderModel names (`encoder.block.N.layer.0.SelfAttention
.q`, ...), so its checkpoints load with no renaming; `models.keymaps.t5_keys` puts the tied
token embedding under `shared.weight`. No buffers: the relative-position buckets are
computed on the fly, so a model built on the meta device is complete after
`load_state_dict(assign=True)`.

The architecture: pre-norm blocks with RMSNorm (no mean, no bias; statistics in fp32),
linears without bias, attention without the 1/sqrt(d) scale plus a learned bias per head
and relative-position bucket that block 0 owns and every block adds, and a gated FFN
wo(gelu_tanh(wi_0 x) * wi_1 x). No attention mask: FLUX encodes and attends the padding.

Precision: everything runs in the dtype of the weights; bf16 is the intended one (it is
also how diffusers runs FLUX's T5, all in bf16). T5 v1.1's activations outgrow fp16's
range, which transformers handles by keeping `wo` in fp32 and clamping infinities. Here,
with fp16 weights, the residual stream is carried in fp32 and `wo` runs in fp32 (its
weight upcast per call); the blocks' other matmuls stay in fp16, as in transformers.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class T5Config:
    """Field names follow transformers' T5Config. The FFN is always gated-gelu (tanh)."""

    vocab_size: int
    d_model: int
    d_kv: int  # per head; the attention's inner width is num_heads * d_kv
    d_ff: int
    num_heads: int
    num_layers: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float


PRESETS = {
    # google/t5-v1_1-xxl (= FLUX.1 text_encoder_2/config.json), the encoder only
    "t5-xxl": T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_heads=64,
        num_layers=24,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
    ),
    # for CPU tests: inner width 4*8 != d_model; max distance 20 so that short sequences
    # reach the exact, the logarithmic and the clamped buckets
    "tiny": T5Config(
        vocab_size=1000,
        d_model=64,
        d_kv=8,
        d_ff=96,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=20,
        layer_norm_epsilon=1e-6,
    ),
}


def relative_position_bucket(
    q_len: int, k_len: int, num_buckets: int, max_distance: int, device=None
) -> torch.Tensor:
    """Bidirectional T5 buckets of key_pos - query_pos -> (q_len, k_len) long.

    Half the buckets for keys after the query, half for keys at or before it. In each
    half, distances below half of it get a bucket each; larger ones share log-spaced
    buckets up to max_distance, and all beyond it share the last one.
    """
    rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    # clamp(min=1) only keeps log() finite where n == 0; those entries take the exact branch
    log_ratio = torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return bucket + torch.where(n < exact, n, far)


class RMSNorm(nn.Module):
    """T5LayerNorm: x / rms(x) * weight, statistics in fp32, result in the weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(
                cfg.relative_attention_num_buckets, cfg.num_heads
            )

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model), position_bias (1, H, L, L) -> (B, L, d_model)."""
        B, L, _ = x.shape
        H, D = self.n_heads, self.d_kv
        q = self.q(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k = self.k(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        v = self.v(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        # T5 has no 1/sqrt(D): it is folded into the initialisation of q
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=1.0)
        y = y.transpose(1, 2).reshape(B, L, H * D)  # (B, L, H*D)
        return self.o(y)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, L, d_ff)
        if h.dtype == torch.float16:  # wo's output overflows fp16 in T5 v1.1: run it in fp32
            return F.linear(h.float(), self.wo.weight.float())
        return self.wo(h)


class T5Block(nn.Module):
    """`layer.0` = (SelfAttention, layer_norm), `layer.1` = (DenseReluDense, layer_norm)."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.layer = nn.ModuleList(
            [
                nn.ModuleDict(
                    dict(
                        SelfAttention=T5Attention(cfg, has_relative_attention_bias),
                        layer_norm=RMSNorm(cfg.d_model, eps),
                    )
                ),
                nn.ModuleDict(
                    dict(
                        DenseReluDense=T5DenseGatedActDense(cfg),
                        layer_norm=RMSNorm(cfg.d_model, eps),
                    )
                ),
            ]
        )

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), position_bias)
        x = x + ff.DenseReluDense(ff.layer_norm(x))
        return x


class T5Encoder(nn.Module):
    """T5 encoder stack.

    forward(input_ids (B, L) long) -> last_hidden_state (B, L, d_model), in the weights'
    dtype; equal to transformers' T5EncoderModel(input_ids).last_hidden_state (no mask).
    """

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleDict(
            dict(
                block=nn.ModuleList(T5Block(cfg, i == 0) for i in range(cfg.num_layers)),
                final_layer_norm=RMSNorm(cfg.d_model, cfg.layer_norm_epsilon),
            )
        )

    def position_bias(self, L: int, device) -> torch.Tensor:
        """-> (1, H, L, L): block 0's learned bias per head, looked up by bucket."""
        buckets = relative_position_bucket(
            L,
            L,
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
            device,
        )
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1).unsqueeze(0)  # (L, L, H) -> (1, H, L, L)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.shared(input_ids)  # (B, L, d_model)
        if x.dtype == torch.float16:
            x = x.float()  # the residual stream outgrows fp16 (see the module docstring)
        bias = self.position_bias(input_ids.shape[1], input_ids.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
