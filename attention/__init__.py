"""Hierarchical global-local attention: layouts, mask rules, BlockMasks, dispatch."""

from .dispatch import Plan, attend, clear_cache
from .layout import DETAIL, GUIDANCE, TEXT, Layout
from .rules import ALL_GUIDANCE_RULE, IMAGE_RULE, VIDEO_RULE, MaskRule

__all__ = [
    "ALL_GUIDANCE_RULE",
    "DETAIL",
    "GUIDANCE",
    "IMAGE_RULE",
    "TEXT",
    "VIDEO_RULE",
    "Layout",
    "MaskRule",
    "Plan",
    "attend",
    "clear_cache",
]
