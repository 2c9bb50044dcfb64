"""The compiled FlexAttention call, shared by every plan."""

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

_compiled = None
RECOMPILE_LIMIT = 64  # kernels: rule shapes x dtypes x batch/head counts x devices


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[2] == n else F.pad(x, (0, 0, 0, n - x.shape[2]))


def flex(q, k, v, block_mask, scale=None, kernel_options=None):
    """torch.compile(flex_attention) with dynamic shapes: one compilation serves every
    sequence length (lookup tables are padded to fixed capacities, see rules.capacity).

    Inputs are zero-padded to the BlockMask's lengths (whole 128-token blocks): torch's
    compiled kernels give wrong results at some ragged lengths (seen on CPU with torch
    2.13 at 8, 24 and 72 tokens; pytorch issue 159247), never at whole blocks. The
    padding keys are rejected by every rule, and padded query rows are dropped."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=True)
    n_q, n_kv = block_mask.seq_lengths
    # Past its recompile limit dynamo would quietly run flex_attention eagerly, which
    # materialises the full score matrix: allow more kernels, then fail loudly.
    with torch._dynamo.config.patch(
        recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
    ):
        out = _compiled(
            _pad(q, n_q),
            _pad(k, n_kv),
            _pad(v, n_kv),
            block_mask=block_mask,
            scale=scale,
            kernel_options=kernel_options,
        )
    return out[:, :, : q.shape[2]]
