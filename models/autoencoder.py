"""The FLUX.1 autoencoder, with BFL's `ae.safetensors` names, and tiled encode/decode.

Image (B, 3, H, W) in [-1, 1]  <->  latent (B, 16, H/8, W/8), scaled and shifted so the
latent has roughly unit variance. The encoder is a stack of resnet blocks with a stride-2
conv between levels, one single-head self-attention block in the middle, and a conv that
gives a mean and a log-variance per latent channel; we keep the mean (deterministic).
The decoder mirrors it with nearest-neighbour upsampling.

Tiled encode/decode cut the input into overlapping tiles of a fixed size, run each tile
alone and blend the overlaps with linear ramps, so working memory stays that of one tile
however large the image (only the output grows). GroupNorm statistics and the middle
attention are per tile, so a tiled result differs a little from the untiled one.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.tiles import blend_weights, check_tiling, tile_starts


@dataclass
class AutoEncoderConfig:
    in_channels: int  # image channels in
    out_ch: int  # image channels out
    ch: int  # channels of the first level; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...]  # one entry per level; levels - 1 stride-2 steps
    num_res_blocks: int  # resnet blocks per encoder level (decoder levels have one more)
    z_channels: int  # latent channels
    num_groups: int  # GroupNorm groups
    eps: float  # GroupNorm epsilon
    scale_factor: float  # latent = scale_factor * (mean - shift_factor)
    shift_factor: float


PRESETS = {
    "flux": AutoEncoderConfig(
        in_channels=3,
        out_ch=3,
        ch=128,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        z_channels=16,
        num_groups=32,
        eps=1e-6,
        scale_factor=0.3611,
        shift_factor=0.1159,
    ),
    # same shape of network (4 levels, so 8x down, 16 latent channels) at toy width
    "tiny": AutoEncoderConfig(
        in_channels=3,
        out_ch=3,
        ch=32,
        ch_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        z_channels=16,
        num_groups=8,
        eps=1e-6,
        scale_factor=0.3611,
        shift_factor=0.1159,
    ),
}


# ---------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------


def _norm(cfg: AutoEncoderConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.num_groups, channels, eps=cfg.eps, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))); a 1x1 conv on the skip when widths differ."""

    def __init__(self, cfg: AutoEncoderConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v, out are 1x1 convs."""

    def __init__(self, cfg: AutoEncoderConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, one token per pixel
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)  # back to (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halves H and W: pad one zero row/column at the bottom/right, then 3x3 conv, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour, then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block` (resnets), then `downsample` or `upsample` if any."""

    def __init__(self, blocks: list[nn.Module], resample: str | None = None, channels: int = 0):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample == "down":
            self.downsample = Downsample(channels)
        elif resample == "up":
            self.upsample = Upsample(channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    """resnet, attention, resnet, at the lowest resolution."""

    def __init__(self, cfg: AutoEncoderConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * z_channels, H/f, W/f): mean then log-variance."""

    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, c_out in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cfg, c_in, c_out))
                c_in = c_out
            self.down.append(Level(blocks, "down" if i < last else None, c_out))
        self.mid = Mid(cfg, c_in)
        self.norm_out = _norm(cfg, c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f).

    `up[i]` works at the width of encoder level i; it runs from the last level to the
    first, so `up` is built in reverse and indexed like the encoder's `down`."""

    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = Mid(cfg, c_in)
        levels = []
        for i in reversed(range(len(widths))):
            c_out = widths[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cfg, c_in, c_out))
                c_in = c_out
            levels.append(Level(blocks, "up" if i > 0 else None, c_out))
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(cfg, c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------
# the autoencoder
# ---------------------------------------------------------------------------------------


class AutoEncoder(nn.Module):
    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along H and W (8 for FLUX)."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def _check(self, t: Tensor, channels: int, what: str, multiple: int = 1) -> None:
        if t.ndim != 4 or t.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, H, W), got {tuple(t.shape)}")
        if t.shape[2] % multiple or t.shape[3] % multiple:
            raise ValueError(
                f"{what} height and width must be multiples of {multiple}, got {tuple(t.shape)}"
            )

    def encode(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> latent (B, z, H/8, W/8), scaled and shifted."""
        cfg = self.config
        self._check(x, cfg.in_channels, "image", self.factor)
        mean = self.encoder(x)[:, : cfg.z_channels]  # the first half; the rest is log-variance
        return cfg.scale_factor * (mean - cfg.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, z, h, w) -> image (B, 3, 8h, 8w), about [-1, 1]."""
        cfg = self.config
        self._check(z, cfg.z_channels, "latent")
        return self.decoder(z / cfg.scale_factor + cfg.shift_factor)

    def encode_tiled(self, x: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """`encode` one tile at a time. `tile` and `overlap` are in latent pixels (64 latent
        = 512 image pixels). Equal to `encode` when the image fits in one tile."""
        check_tiling(tile, overlap)
        self._check(x, self.config.in_channels, "image", self.factor)
        f = self.factor
        return self._tiled(self.encode, x, tile, overlap, scale_in=f, scale_out=1)

    def decode_tiled(self, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """`decode` one tile at a time. `tile` and `overlap` are in latent pixels. Equal to
        `decode` when the latent fits in one tile. Call it under torch.no_grad() (or
        inference_mode) to keep memory that of one tile."""
        check_tiling(tile, overlap)
        self._check(z, self.config.z_channels, "latent")
        f = self.factor
        return self._tiled(self.decode, z, tile, overlap, scale_in=1, scale_out=f)

    def _tiled(self, fn, x: Tensor, tile: int, overlap: int, scale_in: int, scale_out: int):
        """Runs `fn` on overlapping tiles of `x` and blends the results.

        Tiles are laid out on the latent grid (h, w); an input tile is `scale_in` times its
        latent size, an output tile `scale_out` times. The sum is kept in float32."""
        h, w = x.shape[2] // scale_in, x.shape[3] // scale_in  # latent size
        th, tw = min(tile, h), min(tile, w)  # latent tile size
        ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
        so = scale_out
        wys = blend_weights([y * so for y in ys], th * so, h * so)
        wxs = blend_weights([x_ * so for x_ in xs], tw * so, w * so)
        out = None
        for y, wy in zip(ys, wys):
            for x0, wx in zip(xs, wxs):
                si = scale_in
                part = fn(x[:, :, y * si : (y + th) * si, x0 * si : (x0 + tw) * si])
                if out is None:  # (B, C_out, h * so, w * so)
                    out = part.new_zeros(part.shape[:2] + (h * so, w * so), dtype=torch.float32)
                weight = (wy[:, None] * wx[None, :]).to(part.device)  # (th * so, tw * so)
                out[:, :, y * so : (y + th) * so, x0 * so : (x0 + tw) * so] += part * weight
        return out.to(part.dtype)
