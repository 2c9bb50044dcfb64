"""FLUX.1 transformer: full-size key/shape equality with diffusers, tiny-config parity
from every checkpoint format we load, RoPE and packing against diffusers."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from models.flux import PRESETS, Flux, image_ids, pack, rope_angles, text_ids, unpack
from models.flux_files import flux_config_of, load_flux_transformer
from models.keymaps import flux_from_diffusers

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # fp32 max abs error, every parity test here


def diffusers_flux(config, **kw):
    """diffusers' FluxTransformer2DModel at one of our configs."""
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim,
        pooled_projection_dim=config.vec_in_dim,
        guidance_embeds=config.guidance_embed,
        axes_dims_rope=tuple(config.axes_dim),
        **kw,
    )


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize(
    "name, keys, params",
    [("flux-dev", 780, 11_901_408_320), ("flux-schnell", 776, 11_891_178_560)],
)
def test_full_size_keys_match_diffusers(name, keys, params):
    config = PRESETS[name]
    with torch.device("meta"):
        theirs = shapes(flux_from_diffusers(diffusers_flux(config).state_dict()))
        ours = shapes(Flux(config).state_dict())
    missing, unexpected = ours.keys() - theirs.keys(), theirs.keys() - ours.keys()
    assert not missing and not unexpected, (sorted(missing)[:10], sorted(unexpected)[:10])
    wrong = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not wrong, wrong
    assert len(ours) == keys
    assert sum(torch.Size(s).numel() for s in ours.values()) == params


def random_diffusers(config, seed=0):
    """diffusers' model with every weight random (norm scales too), fp32."""
    torch.manual_seed(seed)
    model = diffusers_flux(config).eval()
    sd = model.state_dict()
    sd = {k: torch.randn_like(v) * (0.2 if v.ndim > 1 else 0.5) for k, v in sd.items()}
    model.load_state_dict(sd)
    return model, sd


def inputs(config, B=2, h=3, w=5, L=7, seed=1, id_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(B, h * w, config.in_channels, generator=g),
        img_ids=image_ids(h, w, B) * id_scale,
        txt=torch.randn(B, L, config.context_in_dim, generator=g),
        txt_ids=text_ids(L, B),
        timesteps=torch.tensor([0.3, 0.9])[:B],
        y=torch.randn(B, config.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5, 1.0])[:B] if config.guidance_embed else None,
    )


@torch.no_grad()
def run_diffusers(model, x):
    return model(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"],
    ).sample


def save_formats(tmp_path, sd_diffusers, model):
    """The same weights as a BFL file, a ComfyUI file, and a sharded diffusers folder."""
    bfl = flux_from_diffusers(sd_diffusers)
    save_file({k: v.contiguous() for k, v in bfl.items()}, tmp_path / "flux1-tiny.safetensors")
    comfy = {f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()}
    save_file(comfy, tmp_path / "comfy.safetensors")
    model.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    return {
        "bfl": tmp_path / "flux1-tiny.safetensors",
        "comfyui": tmp_path / "comfy.safetensors",
        "diffusers": tmp_path / "transformer",
    }


@pytest.mark.parametrize("variant", ["flux-dev", "flux-schnell"])
def test_tiny_parity_every_format(tmp_path, variant):
    config = replace(PRESETS["tiny"], guidance_embed=variant == "flux-dev")
    model, sd = random_diffusers(config)
    x = inputs(config)
    ref = run_diffusers(model, x)
    assert ref.abs().max() > 1.0  # a real signal, not zeros
    for fmt, path in save_formats(tmp_path, sd, model).items():
        ours = load_flux_transformer(path, config=config, device="cpu", dtype=torch.float32)
        assert ours.config.guidance_embed == config.guidance_embed
        with torch.no_grad():
            out = ours(**x)
        err = (out - ref).abs().max().item()
        assert err <= TOL, f"{variant} from {fmt}: max abs error {err:.3g} > {TOL}"


def test_parity_scaled_positions_and_perturbation_detected():
    """Float (scaled) positions go through RoPE as diffusers does; and the comparison
    can fail: one perturbed weight moves the output far beyond the tolerance."""
    config = PRESETS["tiny"]
    model, sd = random_diffusers(config, seed=3)
    ours = Flux(config).eval()
    ours.load_state_dict(flux_from_diffusers(sd))
    x = inputs(config, id_scale=0.25)
    x["img_ids"] = x["img_ids"] + 0.375  # guidance-style centred offsets
    with torch.no_grad():
        err = (ours(**x) - run_diffusers(model, x)).abs().max().item()
        assert err <= TOL
        ours.single_blocks[1].linear1.weight[0, 0] += 0.5
        assert (ours(**x) - run_diffusers(model, x)).abs().max() > 100 * TOL


def test_fp8_file_upcast(tmp_path):
    """An fp8 (e4m3fn) file loads upcast; it equals diffusers holding the same rounded
    weights in fp32."""
    config = PRESETS["tiny"]
    model, sd = random_diffusers(config, seed=4)
    rounded = {k: v.to(torch.float8_e4m3fn).float() for k, v in sd.items()}
    model.load_state_dict(rounded)
    fp8 = {k: v.to(torch.float8_e4m3fn).contiguous() for k, v in flux_from_diffusers(sd).items()}
    save_file(fp8, tmp_path / "flux-fp8.safetensors")
    ours = load_flux_transformer(tmp_path / "flux-fp8.safetensors", config=config)
    assert ours.img_in.weight.dtype == torch.float32
    x = inputs(config)
    with torch.no_grad():
        err = (ours(**x) - run_diffusers(model, x)).abs().max().item()
    assert err <= TOL


def test_config_read_from_weights():
    """Full-size presets are recognised from shapes alone (meta tensors, no memory)."""
    for name in ("flux-dev", "flux-schnell"):
        with torch.device("meta"):
            sd = Flux(PRESETS[name]).state_dict()
        assert flux_config_of(sd) == PRESETS[name]


@pytest.mark.parametrize("ntk", [1.0, 10.0])
def test_rope_angles_match_diffusers(ntk):
    pos = torch.tensor([0.0, 1.0, 2.5, 17.0, 63.75, 511.0])
    for d in (16, 56):
        cos, sin = diffusers.models.embeddings.get_1d_rotary_pos_embed(
            d,
            pos,
            theta=10000,
            use_real=True,
            repeat_interleave_real=True,
            ntk_factor=ntk,
            freqs_dtype=torch.float64,
        )  # (n, d), each angle repeated for its pair
        ours = rope_angles(pos[None, :, None], (d,), 10000.0, ntk)[0]  # (n, d/2)
        torch.testing.assert_close(ours.cos().float(), cos[:, ::2].float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.sin().float(), sin[:, ::2].float(), atol=1e-6, rtol=0)


def test_pack_matches_diffusers_and_round_trips():
    from diffusers import FluxPipeline

    latent = torch.randn(2, 16, 6, 10)
    packed = pack(latent)
    assert torch.equal(packed, FluxPipeline._pack_latents(latent, 2, 16, 6, 10))
    assert torch.equal(unpack(packed, 6, 10), latent)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(3, 5)[0], ids)


def test_dev_needs_guidance():
    config = PRESETS["tiny"]
    model = Flux(config)
    x = inputs(config)
    x["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        model(**x)


def test_shard_index_names_every_shard(tmp_path):
    """The sharded folder really is split (so the index path is exercised)."""
    model, sd = random_diffusers(PRESETS["tiny"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
