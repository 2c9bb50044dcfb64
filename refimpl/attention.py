import math

import torch


def attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v in at least fp32.
    q, k, v: (B, H, L, D); mask: (Lq, Lk) bool, True = may attend."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
