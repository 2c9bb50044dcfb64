"""load_flux, the entry point: a tiny FLUX.1 snapshot in each layout users download
(diffusers folders, BFL / ComfyUI single files, one ComfyUI bundle) loads into ready
models that compute what diffusers and transformers compute from the same files."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from models import clip, t5
from models.autoencoder import PRESETS as AE_PRESETS
from models.flux import PRESETS, image_ids, text_ids, unpack
from models.flux_files import load_flux
from models.keymaps import ae_from_diffusers, clip_keys, flux_from_diffusers, t5_keys
from tests.test_autoencoder import diffusers_ae
from tests.test_flux import diffusers_flux, random_diffusers
from tests.test_text_encoders import hf_clip_config, hf_t5_config
from tests.test_tokenizers import clip_dirs, t5_dirs  # noqa: F401  (fixtures)

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # fp32 max abs error
PROMPT = ["a red fox in the snow, 35mm photo", ""]


@pytest.fixture(scope="module")
def oracles(clip_dirs, t5_dirs):  # noqa: F811
    """Tiny random diffusers / transformers models and their tokenizer folders."""
    torch.manual_seed(0)
    flux, _ = random_diffusers(PRESETS["tiny"], seed=5)
    ae = diffusers_ae(AE_PRESETS["tiny"]).eval()
    clip_cfg = replace(clip.PRESETS["tiny"], vocab_size=len(clip_dirs["vocab"]))
    hf_clip = transformers.CLIPTextModel(hf_clip_config(clip_cfg)).eval()
    t5_cfg = replace(t5.PRESETS["tiny"], vocab_size=512)
    hf_t5 = transformers.T5EncoderModel(hf_t5_config(t5_cfg)).eval()
    configs = {"transformer": PRESETS["tiny"], "ae": AE_PRESETS["tiny"]}
    configs |= {"clip": clip_cfg, "t5": t5_cfg}
    return dict(
        flux=flux, ae=ae, clip=hf_clip, t5=hf_t5, configs=configs,
        clip_tok=clip_dirs["files"], t5_tok=t5_dirs["plain"],
    )  # fmt: skip


def contiguous(sd):
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def diffusers_snapshot(tmp_path_factory, oracles):
    """The layout of black-forest-labs/FLUX.1-dev's diffusers folders (sharded)."""
    root = tmp_path_factory.mktemp("snapshot")
    oracles["flux"].save_pretrained(root / "transformer", max_shard_size="20KB")
    oracles["ae"].save_pretrained(root / "vae")
    oracles["clip"].save_pretrained(root / "text_encoder")
    oracles["t5"].save_pretrained(root / "text_encoder_2", max_shard_size="30KB")
    assert len(list((root / "text_encoder_2").glob("*.safetensors"))) > 1
    for name, tok in [("tokenizer", oracles["clip_tok"]), ("tokenizer_2", oracles["t5_tok"])]:
        (root / name).mkdir()
        for f in tok.iterdir():
            (root / name / f.name).write_bytes(f.read_bytes())
    return root


def oracle_bfl(oracles):
    return dict(
        transformer=flux_from_diffusers(oracles["flux"].state_dict()),
        ae=ae_from_diffusers(oracles["ae"].state_dict()),
        clip=clip_keys(oracles["clip"].state_dict()),
        t5=t5_keys(oracles["t5"].state_dict()),
    )


def assert_weights(models, expected: dict, fp8=()):
    for part, sd in expected.items():
        ours = getattr(models, part).state_dict()
        assert ours.keys() == sd.keys(), part
        for k, v in sd.items():
            want = v.to(torch.float8_e4m3fn).float() if part in fp8 else v
            assert torch.equal(ours[k], want), f"{part}: {k}"


def test_diffusers_snapshot_end_to_end(diffusers_snapshot, oracles):
    """Prompt -> tokenizers -> CLIP, T5 -> transformer -> AE decode, ours vs the oracles."""
    m = load_flux(diffusers_snapshot, configs=oracles["configs"], device="cpu")
    assert m.variant == "flux-dev"
    assert_weights(m, oracle_bfl(oracles))

    hf_clip_tok = transformers.CLIPTokenizer.from_pretrained(str(oracles["clip_tok"]))
    clip_ids = m.clip_tokenizer(PROMPT)
    want = hf_clip_tok(PROMPT, padding="max_length", max_length=77, truncation=True)
    assert torch.equal(clip_ids, torch.tensor(want["input_ids"]))
    t5_ids = m.t5_tokenizer(PROMPT)
    assert t5_ids.shape == (2, 512)  # dev pads T5 to 512

    with torch.no_grad():
        pooled = m.clip(clip_ids)
        ref_pooled = oracles["clip"](clip_ids).pooler_output
        assert (pooled - ref_pooled).abs().max() <= TOL
        states = m.t5(t5_ids[:, :24])
        ref_states = oracles["t5"](t5_ids[:, :24]).last_hidden_state
        assert (states - ref_states).abs().max() <= TOL

        h, w = 4, 6  # packed grid: latent 8 x 12, image 64 x 96
        img = torch.randn(2, h * w, 64, generator=torch.Generator().manual_seed(0))
        t, g = torch.tensor([0.8, 0.8]), torch.tensor([3.5, 3.5])
        ids, tids = image_ids(h, w, 2), text_ids(24, 2)
        v = m.transformer(img, ids, states, tids, t, pooled, g)
        ref_v = oracles["flux"](
            hidden_states=img, encoder_hidden_states=ref_states, pooled_projections=ref_pooled,
            timestep=t, img_ids=ids[0], txt_ids=tids[0], guidance=g,
        ).sample  # fmt: skip
        assert (v - ref_v).abs().max() <= TOL

        z = unpack(v, 2 * h, 2 * w)[:, :16]  # any 16-channel latent will do
        image = m.ae.decode(z)
        cfg = AE_PRESETS["tiny"]
        ref_image = oracles["ae"].decode(z / cfg.scale_factor + cfg.shift_factor).sample
        assert image.shape == (2, 3, 64, 96)
        assert (image - ref_image).abs().max() <= TOL


def test_single_files(tmp_path, diffusers_snapshot, oracles):
    """BFL flux1-*.safetensors + ae.safetensors at the top level (preferred over the
    diffusers folders), clip_l without the text_model. prefix, T5 stored in fp8."""
    bfl = oracle_bfl(oracles)
    save_file(contiguous(bfl["transformer"]), tmp_path / "flux1-dev.safetensors")
    save_file(contiguous(bfl["ae"]), tmp_path / "ae.safetensors")
    no_prefix = {k.removeprefix("text_model."): v for k, v in bfl["clip"].items()}
    save_file(contiguous(no_prefix), tmp_path / "clip_l.safetensors")
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in bfl["t5"].items()}
    save_file(contiguous(fp8), tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    m = load_flux(
        transformer=tmp_path / "flux1-dev.safetensors",
        ae=tmp_path / "ae.safetensors",
        clip=tmp_path / "clip_l.safetensors",
        t5=tmp_path / "t5xxl_fp8_e4m3fn.safetensors",
        tokenizers=diffusers_snapshot,
        configs=oracles["configs"],
    )
    assert_weights(m, bfl, fp8={"t5"})
    assert m.t5.state_dict()["shared.weight"].dtype == torch.float32

    # the same top-level files inside a snapshot folder win over its diffusers folders
    for f in ("flux1-dev.safetensors", "ae.safetensors"):
        (diffusers_snapshot / f).write_bytes((tmp_path / f).read_bytes())
    try:
        m = load_flux(diffusers_snapshot, configs=oracles["configs"], parts=("transformer", "ae"))
        assert_weights(m, {k: bfl[k] for k in ("transformer", "ae")})
    finally:
        for f in ("flux1-dev.safetensors", "ae.safetensors"):
            (diffusers_snapshot / f).unlink()


def test_comfyui_bundle(tmp_path, diffusers_snapshot, oracles):
    """One ComfyUI checkpoint holding all four models under its prefixes."""
    bfl = oracle_bfl(oracles)
    prefixes = {
        "transformer": "model.diffusion_model.",
        "ae": "first_stage_model.",
        "clip": "text_encoders.clip_l.transformer.",
        "t5": "text_encoders.t5xxl.transformer.",
    }
    bundle = {prefixes[p] + k: v for p, sd in bfl.items() for k, v in sd.items()}
    save_file(contiguous(bundle), tmp_path / "flux1-dev-all.safetensors")
    m = load_flux(
        transformer=tmp_path / "flux1-dev-all.safetensors",
        tokenizers=diffusers_snapshot,
        configs=oracles["configs"],
    )
    assert_weights(m, bfl)


def test_schnell_detected_and_t5_length(tmp_path, diffusers_snapshot, oracles):
    config = replace(PRESETS["tiny"], guidance_embed=False)
    torch.manual_seed(1)
    schnell = diffusers_flux(config)
    save_file(contiguous(flux_from_diffusers(schnell.state_dict())), tmp_path / "s.safetensors")
    m = load_flux(
        transformer=tmp_path / "s.safetensors",
        tokenizers=diffusers_snapshot,
        configs={"transformer": config},
        parts=("transformer", "tokenizers"),
    )
    assert m.variant == "flux-schnell"
    assert m.t5_tokenizer(["x"]).shape == (1, 256)


def test_missing_parts_are_named(tmp_path, oracles):
    with pytest.raises(ValueError, match="no FLUX transformer"):
        load_flux(tmp_path, parts=("transformer",))
    save_file(contiguous(oracle_bfl(oracles)["transformer"]), tmp_path / "flux1-dev.safetensors")
    with pytest.raises(ValueError, match="no ae checkpoint"):
        load_flux(tmp_path, configs=oracles["configs"], parts=("transformer", "ae"))


def test_variant_without_the_transformer(diffusers_snapshot, oracles):
    """Text encoders and tokenizers alone (loaded and freed before the transformer):
    the variant sets the T5 length, and is required."""
    parts = ("clip", "t5", "tokenizers")
    m = load_flux(diffusers_snapshot, configs=oracles["configs"], parts=parts,
                  variant="flux-schnell")  # fmt: skip
    assert m.transformer is None and m.t5_tokenizer(["x"]).shape == (1, 256)
    with pytest.raises(ValueError, match="variant='flux-dev' or 'flux-schnell'"):
        load_flux(diffusers_snapshot, configs=oracles["configs"], parts=parts)
    with pytest.raises(ValueError, match="but the transformer is flux-dev"):
        load_flux(diffusers_snapshot, configs=oracles["configs"], variant="flux-schnell",
                  parts=("transformer",))  # fmt: skip
