"""The reference: dense masks built from geometry in raster order, and masked softmax
attention in fp32. Slow and obvious on purpose; everything fast is checked against it."""

from .attention import attention
from .mask import raster_mask

__all__ = ["attention", "raster_mask"]
