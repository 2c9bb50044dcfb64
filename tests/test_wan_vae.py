"""models/wan_vae.py: Wan2.1_VAE.pth names and shapes against diffusers' AutoencoderKLWan,
numerical parity on a tiny random model, streams (causality, chunks), balanced tiles,
tiles-outer/time-inner coding (decode_video, encode_video: blending, memory), and
argument checks."""

import copy
import dataclasses
import weakref

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample

from models import wan_vae
from models.keymaps import wan_vae_from_diffusers
from models.tiles import balanced_tiles, blend_weights, tile_starts
from models.wan_vae import (
    PRESETS,
    AttentionBlock,
    CausalConv3d,
    FrameCache,
    Resample,
    WanVAE,
    WanVAEConfig,
)

WAN_PARAMS = 126_892_531  # counted: ours and diffusers' default AutoencoderKLWan agree


def diffusers_vae(cfg: WanVAEConfig) -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=cfg.dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample),
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
    )


def tiny_vae(seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    return WanVAE(PRESETS["tiny"]).eval()


def rand(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------
# 1. full size: names and shapes, on the meta device
# ---------------------------------------------------------------------------------------


def test_wan21_names_and_shapes_match_diffusers_on_meta():
    cfg = PRESETS["wan2.1"]
    with torch.device("meta"):
        ours = WanVAE(cfg)
        theirs = AutoencoderKLWan()  # its defaults are Wan2.1's VAE
    assert theirs.config.base_dim == cfg.dim and theirs.config.latents_std == list(cfg.latents_std)
    assert theirs.config.latents_mean == list(cfg.latents_mean)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in wan_vae_from_diffusers(theirs.state_dict()).items()}
    missing, unexpected = sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())
    shapes = {k: (a[k], b[k]) for k in a.keys() & b.keys() if a[k] != b[k]}
    print("missing:", missing, "unexpected:", unexpected, "shape mismatch:", shapes)
    assert missing == [] and unexpected == [] and shapes == {}
    assert len(a) == 194
    assert sum(p.numel() for p in ours.parameters()) == WAN_PARAMS  # 126.9M
    assert list(ours.named_buffers()) == []  # nothing outside the state dict stays on meta
    # the official wan/modules/vae.py layout: flat Sequentials, residual.{0,2,3,6}, head.{0,2}
    assert a["encoder.conv1.weight"] == (96, 3, 3, 3, 3)
    assert a["encoder.downsamples.3.shortcut.weight"] == (192, 96, 1, 1, 1)
    assert a["encoder.downsamples.5.time_conv.weight"] == (192, 192, 3, 1, 1)  # 3d
    assert "encoder.downsamples.2.resample.1.weight" in a  # 2d: no time_conv
    assert "encoder.downsamples.2.time_conv.weight" not in a
    assert a["encoder.middle.1.to_qkv.weight"] == (1152, 384, 1, 1)
    assert a["encoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert a["encoder.head.0.gamma"] == (384, 1, 1, 1)
    assert a["encoder.head.2.weight"] == (32, 384, 3, 3, 3)
    assert a["conv1.weight"] == (32, 32, 1, 1, 1) and a["conv2.weight"] == (16, 16, 1, 1, 1)
    assert a["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert a["decoder.upsamples.3.resample.1.weight"] == (192, 384, 3, 3)  # halves the width
    assert a["decoder.upsamples.4.residual.2.weight"] == (384, 192, 3, 3, 3)
    assert a["decoder.upsamples.11.resample.1.weight"] == (96, 192, 3, 3)  # 2d
    assert "decoder.upsamples.11.time_conv.weight" not in a
    assert a["decoder.upsamples.14.residual.6.weight"] == (96, 96, 3, 3, 3)
    assert a["decoder.head.2.weight"] == (3, 96, 3, 3, 3)


def test_meta_build_then_assign_load():
    """The loader's path: build on meta, load with assign=True; nothing may stay on meta."""
    ref = tiny_vae()
    with torch.device("meta"):
        vae = WanVAE(PRESETS["tiny"])
    vae.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in vae.state_dict().values())
    z = rand(1, 16, 2, 3, 2)
    with torch.no_grad():
        assert torch.equal(vae.decode(z), ref.decode(z))


# ---------------------------------------------------------------------------------------
# 2. numerical parity on one random tiny model
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    theirs = diffusers_vae(cfg).eval()
    with torch.no_grad():  # RMS-norm gammas default to 1, which would hide a misplaced one
        for name, p in theirs.named_parameters():
            if name.endswith("gamma"):
                p.normal_(1.0, 0.3)
    ours = WanVAE(cfg).eval()
    ours.load_state_dict(wan_vae_from_diffusers(theirs.state_dict()), strict=True)
    return cfg, ours, theirs


def stats(cfg: WanVAEConfig, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers keeps Wan's mean / std in its config and leaves normalising to the
    pipeline: z = (latent_dist.mean - mean) / std, decode(z * std + mean)."""
    mean = torch.tensor(cfg.latents_mean, dtype=dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=dtype).view(1, -1, 1, 1, 1)
    return mean, std


# fp32, 32x48 px: measured max abs error 1.2e-7 (encode, z of std 0.42) and 1.1e-6,
# 4.1e-6, 3.3e-6 (decode of 1, 5, 9 frames; output up to the clamp at 1, reached by 0.03%
# of the pixels). diffusers clamps its decode to [-1, 1]; ours too.
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_tiny_parity_with_diffusers(tiny_pair, frames):
    cfg, ours, theirs = tiny_pair
    mean, std = stats(cfg, torch.float32)
    x = torch.rand(1, 3, frames, 32, 48, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    latent_frames = 1 + (frames - 1) // 4
    with torch.no_grad():
        z = ours.encode(x)
        mu_ref = theirs.encode(x).latent_dist.mean  # raw encoder mean
        y = ours.decode(z)
        y_ref = theirs.decode(z * std + mean).sample
    assert z.shape == (1, 16, latent_frames, 4, 6) and y.shape == (1, 3, frames, 32, 48)
    err_z = (z - (mu_ref - mean) / std).abs().max().item()  # normalised
    err_mu = (ours.denormalize(z) - mu_ref).abs().max().item()  # raw
    err_y = (y - y_ref).abs().max().item()
    print(f"{frames} frames: encode z {err_z:.2e}, mu {err_mu:.2e}; decode {err_y:.2e}")
    assert err_z <= 1e-5 and err_mu <= 1e-5 and err_y <= 1e-5
    assert y.abs().max() <= 1.0


# float64: diffusers' (and Wan's) nearest upsample runs in float32 (`x.float()`, a bf16
# workaround), which rounds float64 to float32 (measured 1e-7 off); without that cast we
# measured 2e-16 (encode) and 5e-15 to 7e-15 (decode): the fp32 gap above is rounding only.
def test_tiny_parity_with_diffusers_float64(tiny_pair, monkeypatch):
    monkeypatch.setattr(WanUpsample, "forward", torch.nn.Upsample.forward)
    cfg, ours, theirs = tiny_pair
    ours, theirs = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double()
    mean, std = stats(cfg, torch.float64)
    x = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(7)).double() * 2 - 1
    with torch.no_grad():
        z = ours.encode(x)
        z_ref = (theirs.encode(x).latent_dist.mean - mean) / std
        err_y = (ours.decode(z) - theirs.decode(z * std + mean).sample).abs().max().item()
    err_z = (z - z_ref).abs().max().item()
    print(f"float64: encode {err_z:.2e}, decode {err_y:.2e}")
    assert err_z <= 1e-12 and err_y <= 1e-12


# ---------------------------------------------------------------------------------------
# 3. streaming: the causal cache makes chunks the same computation as the whole
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel, padding", [(3, 1), ((3, 1, 1), (1, 0, 0))])
def test_causal_conv_chunked_equals_whole(kernel, padding):
    """The core of streaming: a causal conv fed 1, 2, 1, 4, 1 frames with a cache gives
    what it gives on all 9 frames at once (fp32; measured bit-equal here)."""
    torch.manual_seed(0)
    conv = CausalConv3d(4, 5, kernel, padding=padding)
    x = rand(2, 4, 9, 6, 7)
    with torch.no_grad():
        whole = conv(x)
        cache = FrameCache()
        chunks = [conv(c, cache) for c in x.split([1, 2, 1, 4, 1], dim=2)]
    assert whole.shape == (2, 5, 9, 6, 7)
    torch.testing.assert_close(torch.cat(chunks, dim=2), whole, rtol=0, atol=1e-6)
    assert cache[conv].shape[2] == 2  # it keeps the last 2 input frames, no more


@pytest.mark.parametrize("mode, unit", [("upsample3d", 1), ("downsample3d", 2)])
def test_time_resampling_and_attention_take_multi_frame_chunks(mode, unit):
    """After frame 0 (alone), a chunk of k units (1 frame up, 2 frames down: one output
    pair / one stride-2 window each) gives what k one-unit chunks give; attention is per
    frame. fp32, atol 1e-6 (the same sums; measured bit-equal)."""
    torch.manual_seed(0)
    resample, attention = Resample(8, mode).eval(), AttentionBlock(8).eval()
    x = rand(1, 8, 1 + 6 * unit, 6, 4)
    frames = {}
    with torch.no_grad():
        for layer in (resample, attention):
            one, many = FrameCache(), FrameCache()
            singles = [layer(c, one) for c in x.split([1] + [unit] * 6, dim=2)]
            chunked = [layer(c, many) for c in x.split([1, unit, 3 * unit, 2 * unit], dim=2)]
            a, b = torch.cat(singles, dim=2), torch.cat(chunked, dim=2)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
            frames[layer] = [c.shape[2] for c in singles]
        # frame 0 must come alone: a first chunk of 1 + unit frames is all "frame 0" to
        # the resampling, passed through as it is; the stream makes 3 (up) or 2 (down)
        merged = resample(x[:, :, : 1 + unit], FrameCache())
    assert frames[resample][:2] == ([1, 2] if mode == "upsample3d" else [1, 1])
    assert merged.shape[2] == 1 + unit != sum(frames[resample][:2])


def test_chunks_of_a_stream():
    """Latent frame 0 alone, then `chunk` latent frames (4 * chunk video frames) at a time;
    the last chunk takes what is left."""
    vae = tiny_vae()
    as_ranges = lambda cs: [((a.start, a.stop), (v.start, v.stop)) for a, v in cs]
    assert as_ranges(vae._chunks(1, 3)) == [((0, 1), (0, 1))]
    assert as_ranges(vae._chunks(6, 1)) == [((0, 1), (0, 1))] + [
        ((t, t + 1), (1 + 4 * (t - 1), 1 + 4 * t)) for t in range(1, 6)
    ]
    assert as_ranges(vae._chunks(6, 2)) == [
        ((0, 1), (0, 1)),
        ((1, 3), (1, 9)),
        ((3, 5), (9, 17)),
        ((5, 6), (17, 21)),
    ]


def test_stream_is_causal_and_lazy():
    """Frame t of the video depends on latent frames <= t only, and the stream computes a
    chunk only when asked for it: decoding a prefix of z gives a prefix of the video,
    exactly (the same operations on the same numbers); so does encoding a prefix."""
    vae = tiny_vae()
    z = rand(1, 16, 3, 3, 4)
    x = torch.rand(1, 3, 9, 24, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    calls = []
    vae.decoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        stream = vae.decode_stream(z)
        first = next(stream)
        assert len(calls) == 1 and first.shape == (1, 3, 1, 24, 32)  # frame 0 only
        rest = list(stream)
        assert [c.shape[2] for c in rest] == [4, 4]  # then 4 frames per latent frame
        video = torch.cat([first] + rest, dim=2)
        assert torch.equal(video, vae.decode(z))
        assert torch.equal(vae.decode(z[:, :, :2]), video[:, :, :5])
        assert torch.equal(vae.encode(x[:, :, :5]), vae.encode(x)[:, :, :2])
        assert [c.shape[2] for c in vae.decode_stream(z, chunk=2)] == [1, 8]


# fp32: chunks of 2 or 3 latent frames run the same maths as single frames in bigger calls;
# conv kernels may split the sums differently, so not always bit-equal. Measured (6 latent
# frames, so the last chunk is short): bit-equal with 1 CPU thread; with 2, decode max
# 2.4e-6 (output up to 1), encode 1.5e-7 (z std 0.4); 3.4e-6 on a larger frame. Bound 1e-5.
def test_chunked_equals_frame_by_frame():
    vae = tiny_vae()
    z = rand(1, 16, 6, 4, 3)
    x = torch.rand(1, 3, 21, 32, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        y1, e1 = vae.decode_video(z), vae.encode_video(x)
        tiled1 = vae.decode_video(z, tile=3, overlap=1)  # 2 x 1 tiles of 3 x 3
        for chunk in (2, 3):
            y, e = vae.decode_video(z, chunk=chunk), vae.encode_video(x, chunk=chunk)
            stream = torch.cat(list(vae.decode_stream(z, chunk=chunk)), dim=2)
            tiled = vae.decode_video(z, tile=3, overlap=1, chunk=chunk)
            print(f"chunk {chunk}: decode {(y - y1).abs().max():.2e}, ", end="")
            print(f"encode {(e - e1).abs().max():.2e}")
            torch.testing.assert_close(y, y1, rtol=0, atol=1e-5)
            torch.testing.assert_close(stream, y1, rtol=0, atol=1e-5)
            torch.testing.assert_close(e, e1, rtol=0, atol=1e-5)
            torch.testing.assert_close(tiled, tiled1, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 4. tiling
# ---------------------------------------------------------------------------------------


def test_balanced_tiles_cover_with_equal_tiles_of_least_size():
    """Every length 1..60, tile 1..16, overlap 0..tile-1: the first tile starts at 0, the
    last ends at the length, neighbours overlap by >= overlap, the tile count is the least
    possible, and so is the (common) size, which is <= tile; steps differ by <= 1."""
    for length in range(1, 61):
        for tile in range(1, 17):
            for overlap in range(tile):
                starts, size = balanced_tiles(length, tile, overlap)
                n = len(starts)
                assert starts[0] == 0 and starts[-1] + size == length and size <= tile
                steps = [b - a for a, b in zip(starts, starts[1:])]
                assert all(0 < s <= size - overlap for s in steps)
                assert not steps or max(steps) - min(steps) <= 1
                # n tiles of `tile` with overlaps >= overlap reach at most n*tile - (n-1)*o
                assert n == 1 or (n - 1) * tile - (n - 2) * overlap < length
                assert n * (size - 1) - (n - 1) * overlap < length  # one less would not do
                assert (n == 1) == (length <= tile) and (n > 1 or size == length)


def test_balanced_tiles_4k_example():
    """4K: latent 270 x 480, tile 160, overlap 8 -> 2 x 4 tiles of 139 x 126, 8% more
    pixels than the frame; fixed tiles of 144 (models/autoencoder.py's layout), also 2 x 4,
    would do 28% more."""
    assert balanced_tiles(270, 160, 8) == ([0, 131], 139)
    assert balanced_tiles(480, 160, 8) == ([0, 118, 236, 354], 126)
    assert round(2 * 139 * 4 * 126 / (270 * 480), 3) == 1.081
    assert len(tile_starts(270, 144, 8)) == 2 and len(tile_starts(480, 144, 8)) == 4
    assert round(2 * 144 * 4 * 144 / (270 * 480), 3) == 1.28
    assert balanced_tiles(90, 160, 8) == ([0], 90) and balanced_tiles(160, 160, 8) == ([0], 160)


@pytest.mark.parametrize(
    "args, match",
    [
        ((100, 0, 0), "tile >= 1"),
        ((100, 8, 8), "overlap < tile"),
        ((100, 8, -1), "0 <= overlap"),
        ((100, 8.0, 2), "ints"),
        ((0, 8, 2), "length must be an int >= 1"),
    ],
)
def test_balanced_tiles_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        balanced_tiles(*args)


@pytest.mark.parametrize("tile", [None, 6, 9, (6, 5), (40, 40)])  # latent 6x5
def test_one_tile_equals_untiled(tile):
    """One tile (None, or a tile at least as large as the frame) has weight exactly 1:
    decode_video / encode_video are then decode / encode, bit for bit (fp32)."""
    vae = tiny_vae()
    z = rand(1, 16, 3, 6, 5)  # 3 latent frames: the stream's cache is used twice
    x = torch.rand(1, 3, 9, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        y = vae.decode(z)
        assert torch.equal(vae.decode_video(z, tile=tile, overlap=2), y)
        assert torch.equal(vae.encode_video(x, tile=tile, overlap=2), vae.encode(x))


def pixelwise_vae() -> WanVAE:
    """The tiny VAE with pixelwise stand-ins for the networks (each output pixel sees only
    its own latent pixel / 8x8 video block): any tiling must then give back the untiled
    result. They keep the stream's frame counts: 1 then 4t frames, 1 then 4k -> k."""
    vae = tiny_vae()

    def decode_chunk(z, cache):  # (B, 16, t, h, w) -> (B, 3, 1 or 4t, 8h, 8w) in (-1, 1)
        n = 4 if cache else 1
        cache[0] = True
        return torch.tanh(F.interpolate(z[:, :3], scale_factor=(n, 8, 8), mode="nearest"))

    def encode_chunk(x, cache):  # (B, 3, 1 or 4k, H, W) -> (B, 16, 1 or k, H/8, W/8)
        x = x[:, :, 3::4] if cache else x
        cache[0] = True
        return torch.tanh(F.avg_pool3d(x, (1, 8, 8)).repeat(1, 6, 1, 1, 1)[:, :16])

    vae._decode_chunk, vae._encode_chunk = decode_chunk, encode_chunk
    return vae


# latent 21x30: balanced tiles with uneven steps (8, 3: rows at 0, 4, 9, 13), overlap 0,
# overlaps deeper than a tile's half (5, 4: 17 x 26 tiles, five deep), one tile along one
# axis, and chunks of 2 and 3 latent frames; decode and encode. fp32 sums of a few
# weighted terms: atol 1e-6.
@pytest.mark.parametrize(
    "tile, overlap, chunk",
    [(8, 3, 1), (8, 0, 1), (5, 4, 2), (13, 6, 1), ((21, 7), 2, 1), ((6, 30), 1, 3), (16, 5, 2)],
)
def test_tiles_blend_back_to_untiled(tile, overlap, chunk):
    """The weights add up to 1 everywhere and each tile lands where it belongs."""
    vae = pixelwise_vae()
    z = rand(2, 16, 3, 21, 30)
    x = rand(2, 3, 9, 21 * 8, 30 * 8)
    y = vae.decode_video(z, tile=tile, overlap=overlap, chunk=chunk)
    torch.testing.assert_close(y, vae.decode(z), rtol=0, atol=1e-6)
    w = vae.encode_video(x, tile=tile, overlap=overlap, chunk=chunk)
    torch.testing.assert_close(w, vae.encode(x), rtol=0, atol=1e-6)


def test_blend_then_clamp():
    """Two tiles side by side that disagree, the left one 0, the right one 4 (outside
    [-1, 1]): blending then clamping gives clamp(4 w) across the overlap (w the right
    tile's ramp), where clamping first would give w."""
    vae = tiny_vae()

    def decode_chunk(z, cache):  # 0 on every chunk of the first tile, 4 on the second's
        n = 4 * z.shape[2] if cache else 1
        if not cache:  # a new tile
            tiles.append(len(tiles))
            cache[0] = True
        return torch.full((1, 3, n, z.shape[3] * 8, z.shape[4] * 8), 4.0 * tiles[-1])

    tiles = []
    vae._decode_chunk = decode_chunk
    y = vae.decode_video(rand(1, 16, 2, 3, 12), tile=8, overlap=4)
    assert tiles == [0, 1] and balanced_tiles(12, 8, 4) == ([0, 4], 8)
    w = torch.zeros(12 * 8)
    w[32:] = blend_weights([0, 32], 64, 96)[1]  # the right tile's weight, 0 to 1 over 32 px
    want = (4 * w).clamp(-1, 1).expand_as(y)
    assert (want - w).abs().max() > 0.5  # clamping first would be far off
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)


def seam_jump(e: torch.Tensor) -> float:
    """Largest mean step of `e` between neighbouring rows or columns: a seam shows as one."""
    dx = (e[..., :, 1:] - e[..., :, :-1]).abs().mean(dim=(0, 1, 2, 3))
    dy = (e[..., 1:, :] - e[..., :-1, :]).abs().mean(dim=(0, 1, 2, 4))
    return max(dx.max().item(), dy.max().item())


# Tiles see zero padding at their borders and the middle attention sees the tile only (the
# RMS norms are per pixel: no tile statistics, unlike GroupNorm). The decoder's receptive
# field (some 11 3x3 convs at latent resolution alone) is wider than these 8-px tiles, and
# a random model on a random latent is the hard case, so the error is large. Latent 16x16,
# 2 latent frames (5 video frames), output std 0.28-0.32; over seeds 0-3 (model and
# input) we measured: blended (tile 8, overlap 4: 3x3 tiles) mean 0.068-0.073, max
# 0.67-0.80; hard seams (overlap 0: 2x2 tiles) mean 0.114-0.123; seam step 0.097-0.107 vs
# 0.29-0.30. Encode, the same tiles on a random 128x128 video of 5 frames (z std
# 0.35-0.42): blended mean 0.014-0.018, max 0.15-0.19; hard seams mean 0.023-0.028 (ratio
# 0.58-0.64); seam step 0.025-0.034 vs 0.062-0.073 (ratio 0.40-0.47). Bounds: those with
# some margin.
def test_tiled_close_to_untiled_and_blending_beats_seams():
    vae = tiny_vae()
    z = rand(1, 16, 2, 16, 16, seed=2)
    x = torch.rand(1, 3, 5, 128, 128, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        full, z_full = vae.decode(z), vae.encode(x)
        cases = {
            "decode": (vae.decode_video(z, 8, 4) - full, vae.decode_video(z, 8, 0) - full),
            "encode": (vae.encode_video(x, 8, 4) - z_full, vae.encode_video(x, 8, 0) - z_full),
        }
    print(f"output std {full.std():.3f}, z std {z_full.std():.3f}")
    for what, (blend, hard) in cases.items():
        print(
            f"{what}: blended mean {blend.abs().mean():.4f} max {blend.abs().max():.3f}, ", end=""
        )
        print(f"hard seams mean {hard.abs().mean():.4f}; ", end="")
        print(f"seam step {seam_jump(blend):.4f} vs {seam_jump(hard):.4f}")
    blend, hard = cases["decode"]
    assert blend.abs().mean() < 0.09 and blend.abs().max() < 1.0
    assert blend.abs().mean() < 0.7 * hard.abs().mean()
    assert seam_jump(blend) < 0.5 * seam_jump(hard)
    blend, hard = cases["encode"]
    assert blend.abs().mean() < 0.025 and blend.abs().max() < 0.3
    assert blend.abs().mean() < 0.75 * hard.abs().mean()
    assert seam_jump(blend) < 0.6 * seam_jump(hard)


# ---------------------------------------------------------------------------------------
# 5. output type
# ---------------------------------------------------------------------------------------


# A bf16 VAE writes a float16 video (half the memory of float32). The float16 buffer and
# blend weights cost little: against a float32 buffer, error <= ~2 float16 roundings of
# values <= 1 (2^-11 each), measured MEASURED16; bound 1e-3, far below an 8-bit step
# (1/127.5). bf16 arithmetic itself is the larger error: against the fp32 VAE, measured
# over seeds 0-3 mean 4.6e-3 to 4.9e-3, max 3.4e-2 to 5.0e-2 (output std 0.27-0.32);
# bounds 1e-2 and 0.1. The latent comes back in the VAE's dtype.
def test_output_dtype():
    vae, z = tiny_vae(), rand(1, 16, 2, 7, 7) * 0.5
    x = torch.rand(1, 3, 5, 56, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = vae.decode_video(z, tile=4, overlap=1)
    assert ref.dtype == torch.float32 and ref.device.type == "cpu"
    half = copy.deepcopy(vae).to(torch.bfloat16)
    y = half.decode_video(z, tile=4, overlap=1)
    y32 = half.decode_video(z, tile=4, overlap=1, out_dtype=torch.float32)
    assert y.dtype == torch.float16 and y32.dtype == torch.float32
    err16, err = (y.float() - y32).abs(), (y.float() - ref).abs()
    print(f"fp16 vs fp32 buffer: max {err16.max():.2e}; ", end="")
    print(f"bf16 VAE vs fp32: mean {err.mean():.2e}, max {err.max():.2e}")
    assert err16.max() <= 1e-3
    assert err.mean() < 1e-2 and err.max() < 0.1
    assert half.encode_video(x, tile=4, overlap=1).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------
# 6. memory: bounded by one tile, not by the video's length or size
# ---------------------------------------------------------------------------------------


def largest_activation(vae: WanVAE, fn) -> int:
    """Elements in the largest output of any submodule while fn() runs."""
    largest = [0]

    def hook(module, args, out):
        largest[0] = max(largest[0], out.numel())

    handles = [m.register_forward_hook(hook) for m in vae.modules() if m is not vae]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return largest[0]


# latent (frames, h, w), tile 4, overlap 1: one tile; a longer video; larger frames of 2x2
# and 3x3 tiles (7 = 2 tiles of 4, 10 = 3 tiles of 4: balanced tiles all of size 4)
BASE, LONGER, LARGE, LARGER = (2, 4, 4), (5, 4, 4), (2, 7, 7), (2, 10, 10)


def inputs(vae: WanVAE, shape: tuple[int, int, int], seed: int = 0):
    """A latent of `shape` and a video of the matching size."""
    t, h, w = shape
    return rand(1, 16, t, h, w, seed=seed), rand(1, 3, vae.video_frames(t), 8 * h, 8 * w)


def test_activation_memory_independent_of_video_length_and_size():
    vae = tiny_vae()
    (z0, x0), (z1, x1), (z2, x2) = (inputs(vae, s) for s in (BASE, LONGER, LARGER))
    dec = lambda z, **kw: lambda: vae.decode_video(z, tile=4, overlap=1, **kw)
    enc = lambda x, **kw: lambda: vae.encode_video(x, tile=4, overlap=1, **kw)
    per_tile = largest_activation(vae, dec(z0))
    assert per_tile == largest_activation(vae, dec(z1)) == largest_activation(vae, dec(z2))
    assert per_tile == 4 * 16 * 32 * 32  # 4 frames x 16 ch x 32x32 px: a full-resolution block
    per_tile_enc = largest_activation(vae, enc(x0))
    assert per_tile_enc == largest_activation(vae, enc(x1)) == largest_activation(vae, enc(x2))
    assert per_tile_enc == 4 * 16 * 32 * 32  # 4 frames x 16 ch x 32x32 px: a full-res block
    # the measure can fail: untiled, it grows with the frame (10x10 vs 4x4 latent px); with
    # all the frames after frame 0 in one chunk, with the video's length
    assert largest_activation(vae, lambda: vae.decode_video(z2)) > 4 * per_tile
    assert largest_activation(vae, dec(z1, chunk=4)) == 4 * per_tile
    assert largest_activation(vae, lambda: vae.encode_video(x2)) > 4 * per_tile_enc
    assert largest_activation(vae, enc(x1, chunk=4)) == 4 * per_tile_enc


def live_caches(vae: WanVAE, fn, monkeypatch, keep_all: bool = False) -> tuple[int, int]:
    """While fn() runs: the most FrameCaches alive at once, and the most elements they held
    together (sampled after every submodule's forward). keep_all keeps every cache alive,
    as time outer, tiles inner had to: to show the measure can fail."""
    alive, kept, most = weakref.WeakValueDictionary(), [], [0, 0]

    class Tracked(FrameCache):
        def __init__(self):
            super().__init__()
            alive[id(self)] = self
            kept.append(self) if keep_all else None

    def hook(module, args, out):
        most[0] = max(most[0], len(alive))
        most[1] = max(most[1], sum(c.numel() for c in alive.values()))

    monkeypatch.setattr(wan_vae, "FrameCache", Tracked)
    handles = [m.register_forward_hook(hook) for m in vae.modules() if m is not vae]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return most[0], most[1]


def test_one_tile_cache_alive_at_a_time(monkeypatch):
    """decode_video / encode_video: however many tiles (4 or 9), one cache is alive at a
    time, holding the same peak; a tile's cache stops growing after 2 latent frames."""
    vae = tiny_vae()
    (z0, x0), (z1, _), (z2, x2), (z3, x3) = (inputs(vae, s) for s in (BASE, LONGER, LARGE, LARGER))

    def check(fn, small, large):
        run = lambda inp: lambda: fn(inp, tile=4, overlap=1)
        n_small, peak_small = live_caches(vae, run(small), monkeypatch)
        n_large, peak_large = live_caches(vae, run(large), monkeypatch)
        print(f"{fn.__name__}: caches alive {n_small}, {n_large}; peak {peak_small}, {peak_large}")
        assert n_small == n_large == 1 and peak_small == peak_large > 0
        # the measure can fail: keeping every tile's cache, 9 tiles hold 9 caches
        n, peak = live_caches(vae, run(large), monkeypatch, keep_all=True)
        assert n == 9 and peak > 8 * peak_large

    check(vae.decode_video, z2, z3)
    check(vae.encode_video, x2, x3)

    # and a tile's cache stops growing once the stream runs: the last frames of each layer
    def cache_sizes(z):  # after each latent frame of one 4x4 tile
        cache, sizes = FrameCache(), []
        with torch.no_grad():
            for t in range(z.shape[2]):
                vae._decode_chunk(z[:, :, t : t + 1, :4, :4], cache)
                sizes.append(cache.numel())
        return sizes

    short_sizes, long_sizes = cache_sizes(z0), cache_sizes(z1)
    print("cache elements per tile after each latent frame:", long_sizes)
    assert short_sizes == long_sizes[:2] and len(set(long_sizes[2:])) == 1  # full from frame 2


# ---------------------------------------------------------------------------------------
# 7. bad arguments
# ---------------------------------------------------------------------------------------

Z8 = torch.zeros(1, 16, 2, 8, 8)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda v: v.encode(torch.zeros(1, 4, 5, 16, 16)), r"\(B, 3, T, H, W\)"),
        (lambda v: v.encode(torch.zeros(3, 5, 16, 16)), r"\(B, 3, T, H, W\)"),
        (lambda v: v.encode(torch.zeros(1, 3, 4, 16, 16)), r"1 \+ 4k .* got T=4"),
        (lambda v: v.encode(torch.zeros(1, 3, 5, 16, 20)), "multiples of 8"),
        (lambda v: v.encode_video(torch.zeros(1, 3, 4, 16, 16)), r"1 \+ 4k .* got T=4"),
        (lambda v: v.decode(torch.zeros(1, 4, 2, 4, 4)), r"\(B, 16, T, h, w\)"),
        (lambda v: v.decode(torch.zeros(1, 16, 0, 4, 4)), "T >= 1"),
        (lambda v: v.decode_stream(torch.zeros(16, 2, 4, 4)), r"\(B, 16, T, h, w\)"),
        (lambda v: v.decode_stream(Z8, chunk=0), "chunk must be an int >= 1"),
        (lambda v: v.decode_video(torch.zeros(16, 2, 4, 4)), r"\(B, 16, T, h, w\)"),
        (lambda v: v.decode_video(Z8, tile=8, overlap=8), "overlap < tile"),
        (lambda v: v.decode_video(Z8, tile=0, overlap=0), "tile >= 1"),
        (lambda v: v.decode_video(Z8, tile=8.0, overlap=2), r"an int or an \(h, w\) pair"),
        (lambda v: v.decode_video(Z8, tile=(8, 8.0), overlap=2), "ints"),
        (lambda v: v.decode_video(Z8, tile=(8,), overlap=2), r"an \(h, w\) pair"),
        (lambda v: v.decode_video(Z8, tile=(8, 2), overlap=2), "overlap < tile"),
        (lambda v: v.decode_video(Z8, chunk=1.5), "chunk must be an int >= 1"),
        (lambda v: v.encode_video(torch.zeros(1, 3, 5, 16, 16), tile="8"), "tile must be"),
        (lambda v: v.encode_video(torch.zeros(1, 3, 5, 16, 16), chunk=0), "chunk"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_vae())  # decode_stream raises at the call, not at the first frame


def test_bad_config():
    cfg = dataclasses.replace(PRESETS["tiny"], temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="temporal_downsample needs 3 entries"):
        WanVAE(cfg)
