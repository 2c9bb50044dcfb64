"""The Wan2.1 video VAE, with the names of `Wan2.1_VAE.pth`; videos of any length and size
coded in bounded memory: spatial tiles outer, time inner.

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

Streams. Everything is causal, so a video is coded in chunks of time (as Wan does it);
between calls each causal layer keeps the last input frames it needs (at most 2) in a
`FrameCache`, and the chunks join up exactly. Frame 0 (video or latent) must be a chunk of
its own: the time-resampling layers treat the whole first chunk as frame 0. After it, k
latent frames (4k video frames) in one chunk are the same computation as k chunks of one:
the causal convs read the frames before the chunk from the cache, time_conv's frame pairs
(up) and stride-2 windows (down) never straddle a chunk boundary, attention is per frame.
`chunk` (latent frames per call) trades device memory for fewer, larger calls.

Tiles outer, time inner. A large video is cut into overlapping spatial tiles, blended
with linear ramps (models/autoencoder.py's weights, adding up to 1 at every pixel).
`decode_video` and `encode_video` run one tile through the whole video, with a fresh
cache dropped when the tile is done, before the next tile starts. The other order (time
outer, as diffusers' tiled decode and our earlier `decode_stream(tile=...)`) must keep
every tile's cache alive at once, two frames of features per layer over the whole frame:
at 3840x2160, with tiles of 64 latent px, 54 GiB peak on an H200 with the caches on the
GPU, 14 s per frame with them on the CPU. The price: no frame is finished before the last
tile, so the result is assembled in a buffer (the video on the CPU, the latent on the
device).

Memory, whatever the number of frames or of tiles: on the device, one tile's activations
for one chunk + its cache (+ the latent, encoding); on the host, the video + one
tile-chunk. At full size (counted on the meta device), per latent pixel of a tile, the
decoder caches 151K numbers and its largest activation is 49K per latent frame of a chunk
(the encoder: 90K, 25K). 4K (latent 270x480) in tiles of <= 160, i.e. 2 x 4 tiles of 139 x
126 (`balanced_tiles`): a 2.65G-number cache (4.9 GiB in bf16), a 0.86G largest activation.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.flux import fused_on_gpu
from models.tiles import check_tiles, scaled, tiling


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
    input frames (or a marker). One per video, or per spatial tile when tiled; a tiled
    call holds one at a time."""

    def keep(self, layer: nn.Module, frames: Tensor) -> None:
        # a copy, so that the chunk the frames were cut from can be freed
        self[layer] = frames.clone()

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
    call stand in for the zero frames, so chunk by chunk equals the whole stream at once.
    H and W are padded by the convolution itself (no padded copy of the input); time by
    one concatenation with the cached (or zero) frames."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.pad_t, self.pad_h, self.pad_w = 2 * p[0], p[1], p[2]

    def forward(self, x: Tensor, cache: FrameCache | None = None) -> Tensor:
        if self.pad_t > 0:
            past = None if cache is None else cache.get(self)  # (B, C, pad_t, H, W)
            if past is None:  # the stream's start: zero frames in front
                B, C, _, H, W = x.shape
                past = x.new_zeros(B, C, self.pad_t, H, W)
            x = torch.cat([past.to(x), x], dim=2)  # (B, C, pad_t + T, H, W)
            if cache is not None:
                cache.keep(self, x[:, :, -self.pad_t :])
        return F.conv3d(x, self.weight, self.bias, self.stride, (0, self.pad_h, self.pad_w))


def _rms(x: Tensor, gamma: Tensor, scale: float) -> Tensor:
    """x / |x| * scale * gamma over channels (dim 1), in float32 (or wider)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return F.normalize(x.to(wide), dim=1) * scale * gamma.to(wide)


@fused_on_gpu
def rms_norm(x: Tensor, gamma: Tensor, scale: float) -> Tensor:
    return _rms(x, gamma, scale).to(x.dtype)


@fused_on_gpu
def rms_norm_silu(x: Tensor, gamma: Tensor, scale: float) -> Tensor:
    """silu(rms_norm(x)), rounded once: what every residual branch and the head start
    with. On the GPU one compiled kernel: one read and one write of x."""
    return F.silu(_rms(x, gamma, scale)).to(x.dtype)


class RMSNorm(nn.Module):
    """x / |x| * sqrt(C) * gamma, the norm taken over channels (dim 1) at every position,
    in float32. `gamma` is (C, 1, 1, 1) for videos, (C, 1, 1) for frames, as in the
    checkpoint."""

    def __init__(self, channels: int, images: bool = False):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones((channels,) + (1,) * (2 if images else 3)))

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        return (rms_norm_silu if silu else rms_norm)(x, self.gamma, self.scale)


class ResidualBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))); a 1x1x1 conv on the skip when widths
    differ. `residual` keeps the checkpoint's indices: 0 norm, 2 conv, 3 norm, 6 conv
    (1 and 4 are the SiLUs, fused into the norms; 5 is dropout, in training)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(c_in),
            nn.SiLU(),
            CausalConv3d(c_in, c_out, 3, padding=1),
            RMSNorm(c_out),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(c_out, c_out, 3, padding=1),
        )
        self.shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        r = self.residual
        h = r[2](r[0](x, silu=True), cache)
        h = r[6](r[3](h, silu=True), cache)
        return h.add_(self.shortcut(x))


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


@fused_on_gpu
def double_space(x: Tensor) -> Tensor:
    """Nearest x2 in H and W: (B, C, T, H, W) -> (B, C, T, 2H, 2W)."""
    B, C, T, H, W = x.shape
    return x[..., None, :, None].expand(B, C, T, H, 2, W, 2).reshape(B, C, T, 2 * H, 2 * W)


@fused_on_gpu
def double_time_and_space(y: Tensor) -> Tensor:
    """time_conv's (B, 2C, T, H, W), channels [0, C) the first of each pair of frames and
    [C, 2C) the second, -> (B, C, 2T, 2H, 2W) with nearest x2 in H and W: one pass."""
    B, C2, T, H, W = y.shape
    y = y.view(B, 2, C2 // 2, T, H, W).permute(0, 2, 3, 1, 4, 5)  # (B, C, T, 2, H, W)
    y = y[..., None, :, None].expand(B, C2 // 2, T, 2, H, 2, W, 2)
    return y.reshape(B, C2 // 2, 2 * T, 2 * H, 2 * W)


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
        conv = self.resample[1]  # a Conv2d (the checkpoint's shape), run on every frame
        weight = conv.weight.unsqueeze(2)  # (C_out, C_in, 1, k, k): frames stay apart
        if self.mode.startswith("up"):
            if self.mode == "upsample3d" and self in cache:
                x = double_time_and_space(self.time_conv(x, cache))  # (B, C, 2T, 2H, 2W)
            else:  # 2d, or the chunk of frame 0: one frame stays one frame
                cache[self] = True
                x = double_space(x)  # (B, C, T, 2H, 2W)
            return F.conv3d(x, weight, conv.bias, padding=(0, 1, 1))
        x = F.conv3d(F.pad(x, (0, 1, 0, 1)), weight, conv.bias, stride=(1, 2, 2))
        return self._halve_time(x, cache) if self.mode == "downsample3d" else x

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


class Head(nn.Sequential):
    """norm, silu, conv: indices 0 and 2 carry weights (the SiLU is fused into the norm)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(RMSNorm(c_in), nn.SiLU(), CausalConv3d(c_in, c_out, 3, padding=1))

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        return self[2](self[0](x, silu=True), cache)


def _run(layers: nn.Sequential, x: Tensor, cache: FrameCache) -> Tensor:
    """Runs a Sequential of blocks that take the stream's cache."""
    for layer in layers:
        x = layer(x, cache)
    return x


class Encoder(nn.Module):
    """A chunk of video (B, 3, t, H, W) -> (B, 2 z_dim, t', H/8, W/8): mean, log-variance.
    t = 1 (frame 0, alone) gives t' = 1; then chunks of 4k frames give k latent frames."""

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
        self.head = Head(c, 2 * cfg.z_dim)

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return self.head(x, cache)


class Decoder(nn.Module):
    """Latent frames (B, z_dim, t, h, w) -> (B, 3, t', 8h, 8w): latent frame 0 (alone) gives
    t' = 1, then a chunk of t latent frames gives 4t. `upsamples` runs from the deepest
    level up; each upsampling conv halves the width, so the next level's first block
    starts at half width."""

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
        self.head = Head(c, 3)

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return self.head(x, cache)


# ---------------------------------------------------------------------------------------
# tiling
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# the VAE
# ---------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """`encoder`, `conv1` (mean and log-variance, 1x1x1), `conv2` (latent, 1x1x1), `decoder`.

    encode(_video): video (B, 3, 1 + 4k, H, W) in [-1, 1] -> z (B, 16, 1 + k, H/8, W/8),
    normalised. decode / decode_stream / decode_video: z -> 1 + 4(T - 1) frames in [-1, 1],
    clamped (as Wan and diffusers do). *_video: for large videos (tiled, bounded memory)."""

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

    def _chunks(self, latent_frames: int, chunk: int) -> list[tuple[slice, slice]]:
        """(latent frames, video frames) of each call of a stream: latent frame 0 alone,
        then `chunk` latent frames (4 * chunk video frames) at a time."""
        starts = [0, *range(1, latent_frames, chunk)]
        ends = [*starts[1:], latent_frames]
        first = lambda t: 0 if t == 0 else self.video_frames(t)  # latent t's first frame
        return [(slice(a, b), slice(first(a), self.video_frames(b))) for a, b in zip(starts, ends)]

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.parameters())
        return p.device, p.dtype

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

    # --- one call of a stream ----------------------------------------------------------

    def _encode_chunk(self, x: Tensor, cache: FrameCache) -> Tensor:
        """Video frames (B, 3, 1 or 4k, H, W), frame 0 alone, on any device -> normalised
        z (B, 16, 1 or k, H/8, W/8) on the VAE's device: the encoder's mean (the
        log-variance is dropped)."""
        device, dtype = self._device_dtype()
        mu = self.conv1(self.encoder(x.to(device, dtype), cache))[:, : self.config.z_dim]
        return self.normalize(mu)

    def _decode_chunk(self, z: Tensor, cache: FrameCache) -> Tensor:
        """Normalised latent frames (B, 16, t, h, w), latent frame 0 alone, on any device ->
        (B, 3, 1 or 4t, 8h, 8w) on the VAE's device, not clamped. conv2 is 1x1x1, so it
        runs here chunk by chunk, tile by tile."""
        device, dtype = self._device_dtype()
        return self.decoder(self.conv2(self.denormalize(z.to(device)).to(dtype)), cache)

    # --- whole frames ------------------------------------------------------------------

    def encode(self, video: Tensor) -> Tensor:
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> z (B, 16, 1 + k, H/8, W/8), normalised,
        on the VAE's device; frame 0, then 4 frames at a time, over the whole frame."""
        self._check_video(video)
        cache = FrameCache()
        chunks = self._chunks(self.latent_frames(video.shape[2]), 1)
        return torch.cat([self._encode_chunk(video[:, :, v], cache) for _, v in chunks], dim=2)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, 16, T, h, w) -> video (B, 3, 1 + 4(T - 1), 8h, 8w), clamped to [-1, 1]."""
        return torch.cat(list(self.decode_stream(z)), dim=2)

    def decode_stream(self, z: Tensor, chunk: int = 1) -> Iterator[Tensor]:
        """Yields the video of z (B, 16, T, h, w) as it is made, on the VAE's device, clamped:
        frame 0, then 4 * chunk frames per call; together `decode(z)`. Whole frames, one
        cache: for small videos (large: `decode_video`). Use under torch.no_grad(). Checks
        its arguments here, before the first frame is asked for."""
        self._check_latent(z)
        check_tiles(None, 0, chunk)
        return self._stream(z, chunk)

    def _stream(self, z: Tensor, chunk: int) -> Iterator[Tensor]:
        cache = FrameCache()
        for lat, _ in self._chunks(z.shape[2], chunk):
            yield self._decode_chunk(z[:, :, lat], cache).clamp(-1.0, 1.0)

    # --- tiles outer, time inner -------------------------------------------------------

    @torch.no_grad()
    def decode_video(self, z: Tensor, tile=None, overlap: int = 8, chunk: int = 1, out_dtype=None):
        """z (B, 16, T, h, w), normalised, on any device -> video (B, 3, 1 + 4(T - 1), 8h,
        8w) on the CPU, clamped to [-1, 1]. No gradients (an inference path).

        tile: the largest tile side in latent pixels, an int or an (h, w) pair (None: the
        whole frame, then equal to `decode(z)`); tiles are balanced (`balanced_tiles`) and
        overlap by >= `overlap` latent pixels. Each tile runs through the whole video
        (latent frame 0, then `chunk` latent frames at a time) with its own cache; each
        chunk is weighted on the device and added into its region of the output.

        out_dtype: the output buffer's (the blend sums in it, then clamps). Default float16
        for a half or bfloat16 VAE: the video in half the memory of float32, and its
        rounding (2^-11 at 1; with the float16 blend weights, measured 4.9e-4) is far below
        an 8-bit output's step of 1/127.5; float32 otherwise.
        Memory: device, one tile's activations for `chunk` latent frames + its cache;
        host, the output video + one tile-chunk."""
        self._check_latent(z)
        check_tiles(tile, overlap, chunk)
        B, _, T, h, w = z.shape
        f = self.spatial_factor
        device, dtype = self._device_dtype()
        half = dtype in (torch.float16, torch.bfloat16)
        out_dtype = out_dtype or (torch.float16 if half else torch.float32)
        video = torch.zeros(B, 3, self.video_frames(T), h * f, w * f, dtype=out_dtype)
        tiles = tiling(h, w, tile, overlap, f)
        for rows, cols, wy, wx in tiles:
            weight = (wy.to(device)[:, None] * wx.to(device)).to(out_dtype)  # once per tile
            out = video[:, :, :, scaled(rows, f), scaled(cols, f)]  # a view: its region
            cache = FrameCache()  # this tile's, for all its frames
            for lat, vid in self._chunks(T, chunk):
                part = self._decode_chunk(z[:, :, lat, rows, cols], cache).to(out_dtype)
                if len(tiles) == 1:  # the whole frame, weight 1: no blend, a copy
                    out[:, :, vid].copy_(part)
                else:
                    out[:, :, vid].add_(part.mul_(weight).cpu())
            del cache, part  # before the next tile starts
        return video.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def encode_video(self, video: Tensor, tile=None, overlap: int = 8, chunk: int = 1) -> Tensor:
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1], on any device (typically the CPU) -> z
        (B, 16, 1 + k, H/8, W/8), normalised, on the VAE's device, in its dtype. No grads.

        tile, overlap: in latent pixels, as for `decode_video` (a video tile is 8x that;
        None: the whole frame, then equal to `encode(video)`). Each tile runs through the
        whole video (frame 0, then 4 * chunk frames at a time, each moved to the device)
        with its own cache; the latent tiles are blended into a float32 buffer on the
        device (1/48 of the video's numbers), returned in the VAE's dtype.
        Memory: device, one tile's activations for 4 * chunk frames + its cache + the
        latent; host, the input video."""
        self._check_video(video)
        check_tiles(tile, overlap, chunk)
        B, _, frames, H, W = video.shape
        s = self.spatial_factor
        device, dtype = self._device_dtype()
        shape = (B, self.config.z_dim, self.latent_frames(frames), H // s, W // s)
        z = torch.zeros(shape, device=device)  # float32 sums
        for rows, cols, wy, wx in tiling(H // s, W // s, tile, overlap, 1):
            weight = wy.to(device)[:, None] * wx.to(device)  # float32, once per tile
            x = video[:, :, :, scaled(rows, s), scaled(cols, s)]  # a view, moved by chunks
            cache = FrameCache()  # this tile's, for all its frames
            for lat, vid in self._chunks(shape[2], chunk):
                z[:, :, lat, rows, cols].addcmul_(self._encode_chunk(x[:, :, vid], cache), weight)
            del cache  # before the next tile starts
        return z.to(dtype)
