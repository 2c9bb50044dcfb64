"""The Wan2.1 video VAE, with the names of `Wan2.1_VAE.pth`, and streamed, tiled decoding.

Video (B, 3, T, H, W) in [-1, 1], T = 1 + 4k  <->  latent (B, 16, 1 + k, H/8, W/8),
normalised per channel: z = (mu - mean) / std with Wan's 16 means and stds.

The network is the FLUX-style autoencoder made 3D and causal in time: every conv with
a time extent is a `CausalConv3d` (its output frame sees only its input frame and the
ones before it), norms are RMS norms over channels (per position: nothing mixes
positions but the convs), and the single-head attention of the middle block works on
each frame alone. The second and third downsampling steps also halve time, the first two
upsampling steps double it, with one exception that makes the first frame an image:
frame 0 is never merged with, or split into, other frames. So 1 + 4k frames <-> 1 + k
latent frames.

Because everything is causal, the video is coded as a stream (as Wan does it): the
encoder takes frame 0, then 4 frames at a time; the decoder one latent frame at a time
(giving 1 frame, then 4 per latent frame). Between calls each causal layer keeps the last
input frames it needs (at most 2) in a `FrameCache`, so the chunks join up exactly.
`decode_stream` yields the frames chunk by chunk; with `tile` it also cuts every frame
into overlapping spatial tiles, each with its own cache, and blends them with linear
ramps (as models/autoencoder.py does). Working memory is then one tile's, whatever the
video's length or size; the caches hold two frames of features per layer over the whole
frame. At full size, one 256 px tile (32 latent) caches 155M numbers (0.29 GiB in bf16)
and its largest activation is 50M; a 4K frame (480x270 latent) is 220 such tiles, about
64 GiB of caches: keep them on the CPU (`cache_device="cpu"`).
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.autoencoder import blend_weights, check_tiling, tile_starts


@dataclass
class WanVAEConfig:
    dim: int  # channels of the first level; level i has dim * dim_mult[i]
    z_dim: int  # latent channels
    dim_mult: tuple[int, ...]  # one entry per level; levels - 1 stride-2 steps in H and W
    num_res_blocks: int  # residual blocks per encoder level (decoder levels have one more)
    temporal_downsample: tuple[bool, ...]  # per encoder step: does it also halve time?
    latents_mean: tuple[float, ...]  # z = (mu - mean) / std, per latent channel
    latents_std: tuple[float, ...]


# Wan2.1's numbers (wan/modules/vae.py WanVAE; diffusers AutoencoderKLWan defaults agree)
WAN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

PRESETS = {
    "wan2.1": WanVAEConfig(
        dim=96,
        z_dim=16,
        dim_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        temporal_downsample=(False, True, True),
        latents_mean=WAN_LATENTS_MEAN,
        latents_std=WAN_LATENTS_STD,
    ),
    # the same network (4x time, 8x space, 16 latent channels) at 1/6 of the width
    "tiny": WanVAEConfig(
        dim=16,
        z_dim=16,
        dim_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        temporal_downsample=(False, True, True),
        latents_mean=WAN_LATENTS_MEAN,
        latents_std=WAN_LATENTS_STD,
    ),
}


# ---------------------------------------------------------------------------------------
# the stream state
# ---------------------------------------------------------------------------------------


class FrameCache(dict):
    """What the causal layers of one stream remember between chunks: layer -> its last
    input frames (or a marker). One per video, or per spatial tile when tiled.

    `device` is where the frames are kept (None: where they were made). "cpu" keeps the
    caches of a tiled 4K decode off the GPU; they come back one tile at a time."""

    def __init__(self, device: str | torch.device | None = None):
        super().__init__()
        self.device = device

    def keep(self, layer: nn.Module, frames: Tensor) -> None:
        # a copy, so that the chunk the frames were cut from can be freed
        self[layer] = frames.to(self.device or frames.device, copy=True)

    def numel(self) -> int:
        """Elements held: a measure of the stream's memory."""
        return sum(t.numel() for t in self.values() if isinstance(t, Tensor))


# ---------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------


def _per_frame(fn, x: Tensor) -> Tensor:
    """Applies a 2D function to every frame: (B, C, T, H, W) -> (B, C', T, H', W')."""
    B, T = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, H, W) -> (B*T, C', H', W')
    return y.unflatten(0, (B, T)).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """A Conv3d that is causal in time: padding p pads H and W by p on both sides and time
    by 2p zero frames in front, none behind (so kernel 3 keeps the frame count).

    Given a FrameCache it continues a stream: the last 2p input frames of the previous
    call stand in for the zero frames, so chunk by chunk equals the whole stream at once."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.pad_t, self.pad_h, self.pad_w = 2 * p[0], p[1], p[2]

    def forward(self, x: Tensor, cache: FrameCache | None = None) -> Tensor:
        front = self.pad_t  # zero frames in front
        if cache is not None and self.pad_t > 0:
            past = cache.get(self)  # (B, C, <= pad_t, H, W) or None at the start
            if past is not None:
                x = torch.cat([past.to(x), x], dim=2)
                front -= past.shape[2]
            cache.keep(self, x[:, :, -self.pad_t :])
        x = F.pad(x, (self.pad_w, self.pad_w, self.pad_h, self.pad_h, front, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """x / |x| * sqrt(C) * gamma, the norm taken over channels (dim 1) at every position.
    `gamma` is (C, 1, 1, 1) for videos, (C, 1, 1) for frames, as in the checkpoint."""

    def __init__(self, channels: int, images: bool = False):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones((channels,) + (1,) * (2 if images else 3)))

    def forward(self, x: Tensor) -> Tensor:
        # half precision normalises in float32 (as diffusers does)
        normed = F.normalize(x.float() if x.element_size() < 4 else x, dim=1).to(x.dtype)
        return normed * self.scale * self.gamma


_STATELESS = (RMSNorm, nn.SiLU, nn.Identity)  # layers that take no cache


def _run(layers: nn.Sequential, x: Tensor, cache: FrameCache) -> Tensor:
    """Runs a Sequential whose causal members take the stream's cache."""
    for layer in layers:
        x = layer(x) if isinstance(layer, _STATELESS) else layer(x, cache)
    return x


class ResidualBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))); a 1x1x1 conv on the skip when widths
    differ. `residual` keeps the checkpoint's indices: 0 norm, 2 conv, 3 norm, 6 conv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(c_in),
            nn.SiLU(),
            CausalConv3d(c_in, c_out, 3, padding=1),
            RMSNorm(c_out),
            nn.SiLU(),
            nn.Identity(),  # dropout, in training
            CausalConv3d(c_out, c_out, 3, padding=1),
        )
        self.shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        return self.shortcut(x) + _run(self.residual, x, cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame; q, k, v one 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, images=True)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def _attend(self, x: Tensor) -> Tensor:
        N, C, H, W = x.shape  # N = B * T frames
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (N, H*W, 3C)
        q, k, v = qkv[:, None].chunk(3, dim=-1)  # each (N, 1, H*W, C): one head
        h = F.scaled_dot_product_attention(q, k, v)  # (N, 1, H*W, C)
        return self.proj(h[:, 0].transpose(1, 2).reshape(N, C, H, W))

    def forward(self, x: Tensor, cache: FrameCache | None = None) -> Tensor:
        return x + _per_frame(self._attend, x)  # frames alone: nothing to remember


class Resample(nn.Module):
    """Halves (`downsample2d/3d`) or doubles (`upsample2d/3d`) H and W, frame by frame; the
    3d modes also halve or double time with `time_conv`, except for frame 0.

    down: pad one zero row/column at the bottom/right, 3x3 conv with stride 2; then in 3d
          a (3, 1, 1) conv with time stride 2 over [last frame of the previous chunk,
          this chunk]. Frame 0 (the first chunk) passes as it is.
    up:   in 3d, first a causal (3, 1, 1) conv to 2C channels, read as two frames per
          frame (frame 0 is not doubled and is not seen by this conv); then nearest x2 and
          a 3x3 conv to C/2 channels."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        self.mode = mode
        c = channels
        if mode.startswith("up"):
            upsample = nn.Upsample(scale_factor=2.0, mode="nearest-exact")
            self.resample = nn.Sequential(upsample, nn.Conv2d(c, c // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(c, 2 * c, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(c, c, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_time(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._halve_time(x, cache)
        return x

    def _double_time(self, x: Tensor, cache: FrameCache) -> Tensor:
        if self not in cache:  # the chunk of frame 0: one frame stays one frame
            cache[self] = True
            return x
        y = self.time_conv(x, cache)  # (B, 2C, T, H, W), causal over the frames after 0
        B, C2, T, H, W = y.shape
        # channels [0, C) are the first of each pair of frames, [C, 2C) the second
        y = y.view(B, 2, C2 // 2, T, H, W).permute(0, 2, 3, 1, 4, 5)  # (B, C, T, 2, H, W)
        return y.reshape(B, C2 // 2, 2 * T, H, W)

    def _halve_time(self, x: Tensor, cache: FrameCache) -> Tensor:
        past = cache.get(self)  # the last frame of the previous chunk
        cache.keep(self, x[:, :, -1:])
        if past is None:  # the chunk of frame 0 passes as it is
            return x
        return self.time_conv(torch.cat([past.to(x), x], dim=2))  # 1 + T frames -> T / 2


def _middle(channels: int) -> nn.Sequential:
    """resnet, attention, resnet, at the lowest resolution."""
    return nn.Sequential(
        ResidualBlock(channels, channels),
        AttentionBlock(channels),
        ResidualBlock(channels, channels),
    )


def _head(c_in: int, c_out: int) -> nn.Sequential:
    """norm, silu, conv: indices 0 and 2 carry weights."""
    return nn.Sequential(RMSNorm(c_in), nn.SiLU(), CausalConv3d(c_in, c_out, 3, padding=1))


class Encoder(nn.Module):
    """A chunk of video (B, 3, t, H, W) -> (B, 2 z_dim, t', H/8, W/8): mean, log-variance.
    t = 1 (frame 0) gives t' = 1; then chunks of 4 frames give one latent frame each."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        widths = [cfg.dim * m for m in cfg.dim_mult]
        last = len(widths) - 1
        self.conv1 = CausalConv3d(3, cfg.dim, 3, padding=1)
        layers, c = [], cfg.dim
        for level, c_out in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(c, c_out))
                c = c_out
            if level < last:
                time = cfg.temporal_downsample[level]
                layers.append(Resample(c, "downsample3d" if time else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(c)
        self.head = _head(c, 2 * cfg.z_dim)

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return _run(self.head, x, cache)


class Decoder(nn.Module):
    """One latent frame (B, z_dim, 1, h, w) -> (B, 3, t, 8h, 8w): t = 1 for latent frame 0,
    4 for the others. `upsamples` runs from the deepest level up; each upsampling conv
    halves the width, so the next level's first block starts at half width."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        widths = [cfg.dim * m for m in cfg.dim_mult]
        c = widths[-1]
        self.conv1 = CausalConv3d(cfg.z_dim, c, 3, padding=1)
        self.middle = _middle(c)
        layers = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(c, widths[level]))
                c = widths[level]
            if level > 0:  # mirrors the encoder's step from level - 1 to level
                time = cfg.temporal_downsample[level - 1]
                layers.append(Resample(c, "upsample3d" if time else "upsample2d"))
                c = c // 2
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(c, 3)

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return _run(self.head, x, cache)


# ---------------------------------------------------------------------------------------
# the VAE
# ---------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """`encoder`, `conv1` (mean and log-variance, 1x1x1), `conv2` (latent, 1x1x1), `decoder`.

    encode: video (B, 3, 1 + 4k, H, W) in [-1, 1] -> z (B, 16, 1 + k, H/8, W/8), normalised.
    decode / decode_tiled / decode_stream: z -> video in [-1, 1], clamped (as Wan's
    WanVAE.decode and diffusers' AutoencoderKLWan.decode do), 1 + 4(T - 1) frames."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        levels = len(config.dim_mult)
        if len(config.temporal_downsample) != levels - 1:
            raise ValueError(f"temporal_downsample needs {levels - 1} entries, one per step")
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    # --- sizes -------------------------------------------------------------------------

    @property
    def spatial_factor(self) -> int:
        """Video pixels per latent pixel along H and W (8)."""
        return 2 ** (len(self.config.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after frame 0 (4)."""
        return 2 ** sum(self.config.temporal_downsample)

    def latent_frames(self, frames: int) -> int:
        """1 + 4k video frames -> 1 + k latent frames."""
        return 1 + (frames - 1) // self.temporal_factor

    def video_frames(self, latent_frames: int) -> int:
        """1 + k latent frames -> 1 + 4k video frames."""
        return 1 + self.temporal_factor * (latent_frames - 1)

    # --- normalisation -----------------------------------------------------------------

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Wan's per-channel mean and std, shaped (1, z, 1, 1, 1) like `like`."""
        cfg = self.config
        mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device)
        std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device)
        return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    def normalize(self, mu: Tensor) -> Tensor:
        """Encoder mean -> z = (mu - mean) / std, what the transformer works on."""
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        """z -> the decoder's input, z * std + mean."""
        mean, std = self._stats(z)
        return z * std + mean

    # --- checks ------------------------------------------------------------------------

    def _check_video(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(x.shape)}")
        T, H, W = x.shape[2:]
        f, s = self.temporal_factor, self.spatial_factor
        if (T - 1) % f:
            raise ValueError(f"video frames must be 1 + {f}k (1, 5, 9, ...), got T={T}")
        if H % s or W % s:
            raise ValueError(f"video height and width must be multiples of {s}, got {H}x{W}")

    def _check_latent(self, z: Tensor) -> None:
        c = self.config.z_dim
        if z.ndim != 5 or z.shape[1] != c or z.shape[2] < 1:
            raise ValueError(f"latent must be (B, {c}, T, h, w) with T >= 1, got {tuple(z.shape)}")

    # --- encode ------------------------------------------------------------------------

    def encode(self, video: Tensor) -> Tensor:
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> z (B, 16, 1 + k, H/8, W/8), normalised.

        The encoder's mean (the log-variance is dropped), coded causally: frame 0, then 4
        frames at a time. Memory is that of a 4-frame chunk plus the output."""
        self._check_video(video)
        f = self.temporal_factor
        cache = FrameCache()
        T = video.shape[2]
        chunks = [video[:, :, :1]] + [video[:, :, t : t + f] for t in range(1, T, f)]
        mu = [self.conv1(self.encoder(c, cache))[:, : self.config.z_dim] for c in chunks]
        return self.normalize(torch.cat(mu, dim=2))

    # --- decode ------------------------------------------------------------------------

    def decode(self, z: Tensor) -> Tensor:
        """z (B, 16, T, h, w) -> video (B, 3, 1 + 4(T - 1), 8h, 8w), clamped to [-1, 1]."""
        return torch.cat(list(self.decode_stream(z)), dim=2)

    def decode_tiled(
        self, z: Tensor, tile: int = 32, overlap: int = 8, cache_device=None
    ) -> Tensor:
        """`decode` in overlapping spatial tiles of `tile` latent pixels (32 = 256 video
        pixels), blended over `overlap`. Equal to `decode` when the latent fits in one tile.
        The whole video is returned; `decode_stream` avoids holding it."""
        return torch.cat(list(self.decode_stream(z, tile, overlap, cache_device)), dim=2)

    def decode_stream(
        self, z: Tensor, tile: int | None = None, overlap: int = 8, cache_device=None
    ) -> Iterator[Tensor]:
        """Yields the video of z (B, 16, T, h, w) one latent frame at a time: (B, 3, 1, 8h,
        8w) for frame 0, then (B, 3, 4, 8h, 8w) per latent frame; clamped to [-1, 1].
        Concatenated along time they are `decode(z)` (`decode_tiled(z)` with `tile`).

        tile, overlap: spatial tiles in latent pixels (None: the whole frame at once).
        Every tile keeps its own FrameCache for the whole video; `cache_device="cpu"`
        keeps those off the accelerator. Call it under torch.no_grad() (or
        inference_mode) to keep memory that of one tile and the caches. Arguments are
        checked here, before the first frame is asked for."""
        self._check_latent(z)
        if tile is None:
            return self._stream(z, cache_device)
        check_tiling(tile, overlap)
        return self._stream_tiled(z, tile, overlap, cache_device)

    def _stream(self, z: Tensor, cache_device) -> Iterator[Tensor]:
        cache = FrameCache(cache_device)
        for t in range(z.shape[2]):
            yield self._decode_step(z[:, :, t : t + 1], cache).clamp(-1.0, 1.0)

    def _stream_tiled(self, z: Tensor, tile: int, overlap: int, cache_device) -> Iterator[Tensor]:
        T, h, w = z.shape[2:]
        f = self.spatial_factor
        tiles = _tiles(h, w, tile, overlap, f)
        caches = [FrameCache(cache_device) for _ in tiles]
        for t in range(T):
            out = None
            for (ys, xs, weight), cache in zip(tiles, caches):
                part = self._decode_step(z[:, :, t : t + 1, ys, xs], cache)  # (B, 3, n, 8th, 8tw)
                if out is None:  # (B, 3, n, 8h, 8w), summed in float32
                    out = part.new_zeros(part.shape[:3] + (h * f, w * f), dtype=torch.float32)
                ys_out, xs_out = slice(ys.start * f, ys.stop * f), slice(xs.start * f, xs.stop * f)
                out[..., ys_out, xs_out] += part * weight.to(part.device)
            yield out.to(part.dtype).clamp(-1.0, 1.0)

    def _decode_step(self, frame: Tensor, cache: FrameCache) -> Tensor:
        """One normalised latent frame (B, 16, 1, h, w) -> (B, 3, 1 or 4, 8h, 8w), not
        clamped. conv2 is 1x1x1, so it runs here tile by tile, frame by frame."""
        return self.decoder(self.conv2(self.denormalize(frame)), cache)


def _tiles(h: int, w: int, tile: int, overlap: int, f: int) -> list[tuple[slice, slice, Tensor]]:
    """The tiles of an h x w latent frame, in raster order: (latent rows, latent columns,
    weight of each output pixel (th * f, tw * f)). The weights are the linear-ramp blend
    of models/autoencoder.py and add up to 1 at every output pixel."""
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    wys = blend_weights([y * f for y in ys], th * f, h * f)
    wxs = blend_weights([x * f for x in xs], tw * f, w * f)
    return [
        (slice(y, y + th), slice(x, x + tw), wy[:, None] * wx[None, :])
        for y, wy in zip(ys, wys)
        for x, wx in zip(xs, wxs)
    ]
