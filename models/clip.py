"""CLIP text encoder (FLUX's `text_encoder`, CLIP ViT-L/14): its pooled output is FLUX's
`vector` conditioning.

Module names are transformers' CLIPTextModel names (`text_model.encoder.layers.N.self_attn
.q_proj`, ...), so its checkpoints load with no renaming; `models.keymaps.clip_keys` adds the
`text_model.` prefix where a file lacks it and drops the `position_ids` buffer. This module
has no buffers at all: position ids and the causal mask are made on the fly, so a model
built on the meta device is complete after `load_state_dict(assign=True)`.

Pre-LN transformer with a causal mask; no padding mask (FLUX pads to 77 tokens and attends
the padding, like transformers without an `attention_mask`). Everything runs in the dtype
of the weights.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CLIPConfig:
    """Field names follow transformers' CLIPTextConfig."""

    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_eps: float
    hidden_act: str  # "quick_gelu" (x * sigmoid(1.702 x), CLIP-L) or "gelu" (erf)

    def __post_init__(self):
        assert self.hidden_size % self.num_attention_heads == 0
        assert self.hidden_act in ("quick_gelu", "gelu"), self.hidden_act


PRESETS = {
    # openai/clip-vit-large-patch14, text tower (= FLUX.1 text_encoder/config.json)
    "clip-l": CLIPConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
    ),
    # for CPU tests
    "tiny": CLIPConfig(
        vocab_size=1000,
        max_position_embeddings=77,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
    ),
}


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H, D = self.n_heads, C // self.n_heads
        q = self.q_proj(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        v = self.v_proj(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5)
        y = y.transpose(1, 2).reshape(B, L, C)  # (B, L, H*D)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class CLIPTextEncoder(nn.Module):
    """CLIP text tower.

    forward(input_ids (B, L) long, L <= 77) -> pooled (B, hidden_size): the final-LayerNormed
    hidden state at the EOS token. encode(input_ids) -> (pooled, last_hidden_state
    (B, L, hidden_size)), the latter equal to transformers' `last_hidden_state`.

    The EOS position is argmax(input_ids), the first occurrence of the largest id: the
    behaviour transformers keeps for configs with the legacy `eos_token_id: 2`, which
    CLIP ViT-L/14's and FLUX's configs have. The CLIP tokenizer's EOS 49407 is the largest
    id of its 49408, so this is the first EOS (FLUX also pads with 49407).
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.text_model = nn.ModuleDict(
            dict(
                embeddings=nn.ModuleDict(
                    dict(
                        token_embedding=nn.Embedding(cfg.vocab_size, C),
                        position_embedding=nn.Embedding(cfg.max_position_embeddings, C),
                    )
                ),
                encoder=nn.ModuleDict(
                    dict(
                        layers=nn.ModuleList(
                            CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)
                        )
                    )
                ),
                final_layer_norm=nn.LayerNorm(C, eps=cfg.layer_norm_eps),
            )
        )

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled (B, C), last_hidden_state (B, L, C))."""
        B, L = input_ids.shape
        assert L <= self.cfg.max_position_embeddings, (L, self.cfg.max_position_embeddings)
        tm = self.text_model
        positions = torch.arange(L, device=input_ids.device)
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding(positions)
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)  # (B, L, C)
        eos = input_ids.argmax(dim=-1)  # (B,) first occurrence of the largest id
        pooled = x[torch.arange(B, device=x.device), eos]  # (B, C)
        return pooled, x

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encode(input_ids)[0]
