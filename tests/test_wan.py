"""Wan2.1 transformer: full-size key/shape equality with diffusers, tiny-config parity from
every checkpoint format, per-token timesteps, RoPE against diffusers' tables.

The reference is diffusers' WanTransformer3DModel with its timestep sinusoid replaced by
the original's (float64, wan/modules/model.py sinusoidal_embedding_1d): diffusers computes
it in fp32, which moves the tiny model's output by ~2e-4 (measured below); everything
else is diffusers' own code."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from attention import VIDEO_RULE, Layout, Plan
from models.keymaps import is_diffusers_wan, wan_from_diffusers
from models.loading import build, read_checkpoint
from models.wan import (
    PRESETS,
    Wan,
    patchify,
    rope_angles,
    rope_tables,
    sinusoid,
    unpatchify,
    video_ids,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import Timesteps, get_timestep_embedding  # noqa: E402

TOL = 1e-5  # fp32 max abs error, every parity test here (outputs are ~10 in size)
TINY = PRESETS["tiny"]


def diffusers_wan(config):
    """diffusers' WanTransformer3DModel at one of our configs (the T2V settings)."""
    return diffusers.WanTransformer3DModel(
        patch_size=config.patch_size,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_dim,
        out_channels=config.out_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    )


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


# REFERENCE.md D (measured): 825 / 1,418,996,800 and 1095 / 14,288,491,584; these agree
@pytest.mark.parametrize(
    "name, keys, params",
    [("wan-t2v-1.3b", 825, 1_418_996_800), ("wan-t2v-14b", 1095, 14_288_491_584)],
)
def test_full_size_keys_match_diffusers(name, keys, params):
    config = PRESETS[name]
    with torch.device("meta"):
        theirs_raw = diffusers_wan(config).state_dict()
        ours = shapes(Wan(config).state_dict())
    assert is_diffusers_wan(theirs_raw) and not is_diffusers_wan(ours)
    theirs = shapes(wan_from_diffusers(theirs_raw))
    missing, unexpected = ours.keys() - theirs.keys(), theirs.keys() - ours.keys()
    assert not missing and not unexpected, (sorted(missing)[:10], sorted(unexpected)[:10])
    wrong = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not wrong, wrong
    assert len(ours) == keys
    assert sum(torch.Size(s).numel() for s in ours.values()) == params
    assert ours["blocks.0.modulation"] == (1, 6, config.dim)
    assert ours["head.modulation"] == (1, 2, config.dim)
    assert ours["patch_embedding.weight"] == (config.dim, 16, 1, 2, 2)


class OriginalSinusoid(torch.nn.Module):
    """Stands in for diffusers' Timesteps: the original's float64 sinusoid, then fp32."""

    def forward(self, t):
        return sinusoid(t, TINY.freq_dim).float()


def random_diffusers(config=TINY, seed=0):
    """diffusers' model with every weight random (norms and modulation tables too), fp32,
    and the original timestep sinusoid."""
    torch.manual_seed(seed)
    model = diffusers_wan(config).eval()
    sd = {
        k: torch.randn_like(v) * (0.2 if v.ndim > 1 else 0.5) for k, v in model.state_dict().items()
    }
    model.load_state_dict(sd)
    model.condition_embedder.timesteps_proj = OriginalSinusoid()
    return model, sd


def inputs(config=TINY, B=2, frames=3, h=4, w=6, L_txt=5, seed=1):
    """A latent video (3 latent frames of 4x6: 3x2x3 = 18 tokens) and a context shorter
    than text_len; the diffusers pipeline zero-pads it to text_len, so its model gets it so."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, L_txt, config.text_dim, generator=g)
    return dict(
        latent=torch.randn(B, config.in_dim, frames, h, w, generator=g),
        t=torch.tensor([250.0, 900.0])[:B],
        context=context,
        padded=F.pad(context, (0, 0, 0, config.text_len - L_txt)),
    )


@torch.no_grad()
def run_diffusers(model, x, t=None, context=None):
    t = x["t"] if t is None else t
    context = x["padded"] if context is None else context
    return model(hidden_states=x["latent"], timestep=t, encoder_hidden_states=context).sample


def formats(tmp_path, sd, model):
    """The same weights as state dicts read from: the key map alone, an original-format
    safetensors file, and a sharded diffusers folder (save_pretrained, index.json)."""
    original = wan_from_diffusers(sd)
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "wan-tiny.safetensors")
    model.save_pretrained(tmp_path / "transformer", max_shard_size="50KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    folder = read_checkpoint(tmp_path / "transformer")
    assert is_diffusers_wan(folder) and folder.keys() == sd.keys()
    return {
        "key map": original,
        "original file": read_checkpoint(tmp_path / "wan-tiny.safetensors"),
        "diffusers folder": wan_from_diffusers(folder),
    }


def test_tiny_parity_every_format(tmp_path):
    model, sd = random_diffusers()
    x = inputs()
    ref = run_diffusers(model, x)
    assert ref.abs().max() > 1.0  # a real signal, not zeros
    for fmt, state in formats(tmp_path, sd, model).items():
        ours = build(lambda: Wan(TINY), state, what=f"Wan from {fmt}")
        with torch.no_grad():
            out = ours(x["latent"], x["t"], x["context"])
        assert out.dtype == torch.float32 and out.shape == x["latent"].shape
        err = (out - ref).abs().max().item()
        assert err <= TOL, f"from {fmt}: max abs error {err:.3g} > {TOL}"


def test_padding_rows_and_sinusoid_matter_and_perturbation_detected():
    """The comparison can fail: the text padding (the zero rows go through
    text_embedding and are attended), diffusers' own fp32 sinusoid, and one perturbed
    weight each move the output beyond the tolerance."""
    model, sd = random_diffusers(seed=2)
    ours = Wan(TINY).eval()
    ours.load_state_dict(wan_from_diffusers(sd))
    x = inputs()
    with torch.no_grad():
        out = ours(x["latent"], x["t"], x["context"])
        assert (out - run_diffusers(model, x)).abs().max() <= TOL
        assert torch.equal(out, ours(x["latent"], x["t"], x["padded"]))  # pads as the caller
        unpadded = run_diffusers(model, x, context=x["context"])  # cross-attn over 5 rows only
        assert (out - unpadded).abs().max() > 100 * TOL
        model.condition_embedder.timesteps_proj = Timesteps(
            TINY.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        fp32_sinusoid = (out - run_diffusers(model, x)).abs().max().item()
        assert 0 < fp32_sinusoid <= 1e-3, fp32_sinusoid  # diffusers' fp32 sinusoid: ~2e-4
        ours.blocks[1].norm3.weight += 0.5  # the cross-attention's norm
        assert (ours(x["latent"], x["t"], x["context"]) - out).abs().max() > 100 * TOL


@torch.no_grad()
def test_token_forward_any_order_and_plan():
    """The token-level forward (what the hierarchical methods call) equals the video
    forward, in any token order with its ids; a one-window Plan equals dense attention."""
    model, sd = random_diffusers(seed=3)
    ours = Wan(TINY).eval()
    ours.load_state_dict(wan_from_diffusers(sd))
    x = inputs()
    video = ours(x["latent"], x["t"], x["context"])
    tokens, grid = patchify(x["latent"])
    assert tokens.shape == (2, 18, TINY.token_dim) and grid == (3, 2, 3)
    assert torch.equal(unpatchify(tokens, grid), x["latent"])
    ids = video_ids(*grid, batch=2)
    out = ours(tokens, x["t"], x["context"], ids)
    assert torch.equal(unpatchify(out, grid), video)
    perm = torch.randperm(18, generator=torch.Generator().manual_seed(0))
    shuffled = ours(tokens[:, perm], x["t"], x["context"], ids[:, perm])
    assert (shuffled - out[:, perm]).abs().max() <= TOL
    plan = Plan(Layout(grid=grid, window=grid), VIDEO_RULE, backend="reference")
    assert (ours(tokens, x["t"], x["context"], ids, plan=plan) - out).abs().max() <= TOL


@torch.no_grad()
def test_per_token_timesteps():
    """t (B, L): all-equal rows give exactly the (B,) result; mixed values (a clean proxy
    beside noisy detail) equal diffusers' per-token path (Wan2.2 TI2V's (B, L) timesteps);
    without blocks, each token's output is the model run at its own scalar t."""
    model, sd = random_diffusers(seed=4)
    ours = Wan(TINY).eval()
    ours.load_state_dict(wan_from_diffusers(sd))
    x = inputs()
    L = 18
    scalar = ours(x["latent"], x["t"], x["context"])
    same = ours(x["latent"], x["t"][:, None].expand(2, L), x["context"])
    assert torch.equal(same, scalar)

    t = torch.full((2, L), 900.0)
    t[:, :6] = 0.0  # the first frame's tokens clean, the rest noisy
    t[1, 6:] = 250.0
    e, e0, index = ours.time_tables(t)
    assert e.shape == (3, TINY.dim) and e0.shape == (3, 6, TINY.dim) and index.shape == (2, L)
    err = (ours(x["latent"], t, x["context"]) - run_diffusers(model, x, t=t)).abs().max()
    # 2e-5, not TOL: outputs reach ~20 here and fp32 rounding alone is that large (our own
    # fp64 forward is 0.8-1.3e-5 from our fp32 one, and as far from diffusers, seeds 4-8)
    assert err <= 2e-5, err
    assert (ours(x["latent"], t, x["context"]) - scalar).abs().max() > 100 * TOL

    ours.blocks = torch.nn.ModuleList()  # head only: no token sees another
    tokens, grid = patchify(x["latent"])
    ids = video_ids(*grid, batch=2)
    mixed = ours(tokens, t, x["context"], ids)
    for value in (0.0, 250.0, 900.0):
        alone = ours(tokens, torch.full((2,), value), x["context"], ids)
        where = t == value
        assert (mixed[where] - alone[where]).abs().max() <= TOL


def test_rope_angles_match_diffusers_tables():
    """Angles of integer positions equal diffusers' WanRotaryPosEmbed tables (head_dim
    128: 44 / 42 / 42); scaled positions (AtlasVid: proxy ×(T/t, H/h, W/w), temporal ×4)
    give the angles of the scaled positions, and fractional ones are linear in them."""
    config = PRESETS["wan-t2v-1.3b"]
    assert config.axes_dim == (44, 42, 42) and TINY.axes_dim == (12, 10, 10)
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
    f, h, w = 3, 4, 5
    cos_ref, sin_ref = rope(torch.zeros(1, 16, f, 2 * h, 2 * w))  # (1, L, 1, 128)
    cos, sin = rope_tables(video_ids(f, h, w), config.axes_dim, config.theta)  # (1, 1, L, 64)
    assert torch.equal(cos[0, 0], cos_ref[0, :, 0, 0::2])  # both fp64 angles, rounded once
    assert torch.equal(sin[0, 0], sin_ref[0, :, 0, 1::2])

    # far positions (a 4K latent grid is 21 x 135 x 240 tokens; ×4 temporal), by axis
    pos = torch.tensor([[[20.0, 134.0, 239.0], [80.0, 540.0, 960.0]]])
    cos, sin = rope_tables(pos, config.axes_dim, config.theta)  # (1, 1, 2, 64)
    for table, ours in [(rope.freqs_cos, cos), (rope.freqs_sin, sin)]:
        axes = torch.split(table[:, 0::2], (22, 21, 21), dim=1)  # rows: positions 0..1023
        want = torch.cat([axes[a][pos[0, :, a].long()] for a in range(3)], dim=1)
        assert torch.equal(ours[0, 0], want)

    ids = video_ids(f, h, w)
    scale = torch.tensor([4.0, 2.0, 2.0])  # temporal x4, proxy at half resolution
    scaled = rope_angles(ids * scale, config.axes_dim, config.theta)
    bigger = video_ids(4 * (f - 1) + 1, 2 * (h - 1) + 1, 2 * (w - 1) + 1)
    big = rope_angles(bigger, config.axes_dim, config.theta).reshape(
        4 * (f - 1) + 1, 2 * (h - 1) + 1, 2 * (w - 1) + 1, 64
    )
    assert torch.equal(scaled[0].reshape(f, h, w, 64), big[::4, ::2, ::2])
    base = rope_angles(ids, config.axes_dim, config.theta)
    frac = rope_angles(ids * 0.375 + 0.5, config.axes_dim, config.theta)
    one = rope_angles(torch.ones(1, 1, 3), config.axes_dim, config.theta)
    assert torch.allclose(frac, base * 0.375 + 0.5 * one, rtol=0, atol=1e-12)


def test_sinusoid_is_wans():
    """Raw timesteps (no ×1000), [cos | sin], float64; diffusers' fp32 version within fp32
    rounding of 1000-radian arguments."""
    t = torch.tensor([0.0, 250.0, 999.0])
    emb = sinusoid(t, 256)
    assert emb.dtype == torch.float64 and emb.shape == (3, 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]).double())
    j = torch.arange(128, dtype=torch.float64)
    assert torch.allclose(emb[1, :128], torch.cos(250.0 * 10000.0 ** (-j / 128)), atol=1e-12)
    theirs = get_timestep_embedding(t, 256, True, 0)
    assert (emb.float() - theirs).abs().max() <= 2e-4


def test_patch_order_is_wans():
    """Tokens hold (pt, ph, pw, c) with c fastest, as Wan's unpatchify reads them."""
    latent = torch.arange(2 * 16 * 1 * 2 * 4, dtype=torch.float32).reshape(2, 16, 1, 2, 4)
    tokens, grid = patchify(latent)
    assert grid == (1, 1, 2) and tokens.shape == (2, 2, 64)
    # token 1 covers columns 2-3; channel c of cell (ph, pw) sits at (ph·2 + pw)·16 + c
    for ph in range(2):
        for pw in range(2):
            assert torch.equal(
                tokens[:, 1, (ph * 2 + pw) * 16 : (ph * 2 + pw + 1) * 16],
                latent[:, :, 0, ph, 2 + pw],
            )
    with pytest.raises(ValueError, match="patches"):
        patchify(latent[..., :3])


def test_bad_inputs_are_named():
    ours = Wan(replace(TINY, num_layers=1)).eval()
    x = inputs()
    with pytest.raises(ValueError, match="text_len|≤16"):
        ours(x["latent"], x["t"], torch.zeros(2, 17, TINY.text_dim))
    with pytest.raises(ValueError, match="pass ids"):
        ours(patchify(x["latent"])[0], x["t"], x["context"])
    with pytest.raises(ValueError, match=r"t must be"):
        ours(x["latent"], torch.zeros(2, 5), x["context"])
