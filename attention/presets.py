"""Named attention layouts at the sizes the benchmarks and `attention.show` use.

FLUX: 16 px per token (8x VAE, 2x2 patches), windows of 16x16 tokens (256 px), guidance
ratio 4, 512 T5 tokens, 24 heads. Wan: 8x spatial / 4x temporal VAE and 2x2 patches,
cubes of (4, 8, 8) tokens, proxy ratio 4 in time and space, 12 heads (1.3B).
The FLUX presets use guidance scope `all`, the heavier rule (bench/results/attention.md
was measured with it); the image default IMAGE_RULE is `aligned(1)`."""

from .layout import Layout
from .rules import ALL_GUIDANCE_RULE as ALL
from .rules import VIDEO_RULE

PRESETS = {
    # name: (layout, rule, heads, head_dim)
    "tiny": (Layout(grid=(12, 20), window=(4, 8), text=7, ratio=2), ALL, 2, 16),
    "flux-4k": (Layout(grid=(256, 256), window=(16, 16), text=512, ratio=4), ALL, 24, 128),
    "flux-8k": (Layout(grid=(512, 512), window=(16, 16), text=512, ratio=4), ALL, 24, 128),
    # 3840x2160, 81 frames -> 21 latent frames of 135x240 tokens; proxy 6x34x60
    "wan-4k-81f": (
        Layout(grid=(21, 135, 240), window=(4, 8, 8), text=0, ratio=(4, 4)),
        VIDEO_RULE,
        12,
        128,
    ),
}
