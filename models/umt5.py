"""umT5 encoder (Wan2.1's text encoder, umT5-XXL) and Wan's text pipeline.

Module names are transformers' UMT5EncoderModel names (`shared`, `encoder.block.N.layer.0
.SelfAttention.{q,k,v,o,relative_attention_bias}`, ...), so its checkpoints load with no
renaming; `models.keymaps.umt5_from_wan` renames Wan's own .pth (models_t5_umt5-xxl-enc-bf16
.pth) and `models.keymaps.t5_keys` puts a tied `encoder.embed_tokens` under `shared`. No
buffers: a model built on the meta device is complete after `load_state_dict(assign=True)`.

The blocks are T5 v1.1's (models/t5.py: RMSNorm, no 1/sqrt(d), gated-gelu FFN) with two
differences:
  - every block owns a relative-position bias table (T5: block 0's, shared by all);
  - attention takes the padding mask: padding keys get no weight (FLUX's T5 attends them).
    Padding queries are still computed; Wan drops those rows afterwards.

Wan's text pipeline (wan/modules/t5.py T5EncoderModel, wan/modules/tokenizers.py):
  1. clean each prompt: ftfy.fix_text, html.unescape twice, strip, whitespace runs -> " ",
     strip (`clean_text`; ftfy only when installed, Wan always has it);
  2. tokenise to 512 ids with EOS, truncating and padding (`tokenize`);
  3. encode with the attention mask, keep the rows of each prompt's tokens (EOS included),
     and zero-pad back to 512 rows (the cut is wan/modules/t5.py, the zero-padding
     WanModel.forward); `encode_prompts` does all three: (B, 512, 4096).
`models.tokenizers.T5Tokenizer` returns ids only, so the attention mask is rebuilt here from
the ids: padding is the run of pad ids at the end of a row (a `<pad>` written in the prompt
is a token, as transformers counts it).

Precision: as models/t5.py, everything in the weights' dtype (Wan runs umT5 in bf16); with
fp16 weights the residual stream is carried in fp32.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.t5 import RMSNorm, T5Block, T5Config, relative_position_bucket

try:
    import ftfy
except ImportError:  # optional, as in transformers; Wan requires it
    ftfy = None


@dataclass(frozen=True)
class UMT5Config(T5Config):
    """transformers' UMT5Config field names: the same fields as T5Config (the FFN is
    gated-gelu, tanh). umT5 differs from T5 in the model, not in its configuration."""


PRESETS = {
    # google/umt5-xxl config.json = Wan's umt5_xxl() (wan/modules/t5.py), the encoder only
    "umt5-xxl": UMT5Config(
        vocab_size=256384,
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
    "tiny": UMT5Config(
        vocab_size=1000,
        d_model=64,
        d_kv=8,
        d_ff=96,
        num_heads=4,
        num_layers=3,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=20,
        layer_norm_epsilon=1e-6,
    ),
}


class UMT5Encoder(nn.Module):
    """umT5 encoder stack.

    forward(input_ids (B, L) long, attention_mask (B, L) 1/0 or bool, or None)
    -> last_hidden_state (B, L, d_model) in the weights' dtype; equal to transformers'
    UMT5EncoderModel(input_ids, attention_mask).last_hidden_state. attention_mask None:
    every token attends every token.
    """

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        blocks = [T5Block(cfg, has_relative_attention_bias=True) for _ in range(cfg.num_layers)]
        self.encoder = nn.ModuleDict(
            dict(
                block=nn.ModuleList(blocks),
                final_layer_norm=RMSNorm(cfg.d_model, cfg.layer_norm_epsilon),
            )
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, L = input_ids.shape
        if attention_mask is not None and attention_mask.shape != (B, L):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(B, L)}"
            )
        x = self.shared(input_ids)  # (B, L, d_model)
        if x.dtype == torch.float16:
            x = x.float()  # the residual stream outgrows fp16 (models/t5.py)
        buckets = relative_position_bucket(
            L,
            L,
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
            input_ids.device,
        )  # (L, L)
        padding = None
        if attention_mask is not None:
            padding = ~attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): padding keys
        for block in self.encoder.block:
            table = block.layer[0].SelfAttention.relative_attention_bias
            bias = table(buckets).permute(2, 0, 1).unsqueeze(0)  # (L, L, H) -> (1, H, L, L)
            if padding is not None:
                # the most negative finite value, as Wan and transformers: a row whose keys
                # are all padding stays finite (uniform) instead of NaN
                bias = bias.masked_fill(padding, torch.finfo(bias.dtype).min)  # (B, H, L, L)
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# ---------------------------------------------------------------------------------------
# Wan's text pipeline
# ---------------------------------------------------------------------------------------

# Unicode White_Space: what `\s` matches in the `regex` module that Wan uses. Python's `re`
# would also match U+001C..U+001F; those are only stripped at the ends (str.strip).
_WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_text(text: str) -> str:
    """Wan's prompt clean-up (HuggingfaceTokenizer, clean="whitespace").

    ftfy.fix_text when ftfy is installed, HTML entities unescaped twice ("&amp;lt;" -> "<"),
    strip, every run of whitespace -> one space, strip.
    """
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def true_lengths(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, L) right-padded ids -> (B,) long: tokens before the trailing run of pad ids.

    Every tokenised row ends with EOS before its padding, so a pad id written in the text
    (`<pad>`) lies inside the length, as transformers' attention mask counts it.
    """
    L = ids.shape[1]
    pos = torch.arange(1, L + 1, device=ids.device)  # (L,): 1-based positions
    return ((ids != pad_id) * pos).amax(dim=1)  # (B,): last non-pad position, 0 if none


def tokenize(tokenizer, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cleaned, tokenised prompts, as Wan's HuggingfaceTokenizer(clean="whitespace") with
    return_mask=True: ids (B, max_length) long and attention_mask (B, max_length) bool.

    tokenizer: a `models.tokenizers.T5Tokenizer` (umT5's spiece.model, max_length 512).
    """
    if isinstance(texts, str):
        texts = [texts]
    ids = tokenizer([clean_text(t) for t in texts])  # (B, L)
    lengths = true_lengths(ids, tokenizer.pad_id)  # (B,)
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # (B, L)
    return ids, mask


def encode_prompts(
    tokenizer, encoder: UMT5Encoder, texts: str | Sequence[str], length: int = 512
) -> torch.Tensor:
    """Wan's text conditioning: (B, length, d_model) in the encoder's dtype, on its device.

    Row i of prompt b is the encoder's output (with the attention mask) for i below the
    prompt's token count (EOS included) and exactly zero from there on. The tokenizer must
    cut at `length` too (Wan: text_len 512 for both). Call under torch.inference_mode().
    """
    if tokenizer.max_length != length:
        raise ValueError(
            f"the tokenizer cuts at {tokenizer.max_length} tokens, not {length}: build it with "
            f"max_length={length}"
        )
    ids, mask = tokenize(tokenizer, texts)  # (B, length) each
    device = encoder.shared.weight.device
    ids, mask = ids.to(device), mask.to(device)
    out = encoder(ids, mask)  # (B, length, d_model)
    return out.masked_fill(~mask[:, :, None], 0.0)  # Wan: cut to the true length, zero-pad
