"""load_wan, the entry point: tiny Wan2.1 snapshots in the original layout (sharded
safetensors, .pth VAE and umT5 in Wan's names) and the diffusers layout load into our
models with exactly the oracles' weights; bad inputs are clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from models import umt5
from models.keymaps import t5_keys, umt5_from_wan, wan_from_diffusers, wan_vae_from_diffusers
from models.loading import CheckpointError
from models.wan import PRESETS
from models.wan_files import load_umt5, load_wan, load_wan_transformer, load_wan_vae
from models.wan_vae import PRESETS as VAE_PRESETS
from tests.test_umt5 import hf_config, to_wan, umt5_folder  # noqa: F401  (fixture)
from tests.test_wan import random_diffusers
from tests.test_wan_vae import diffusers_vae

transformers = pytest.importorskip("transformers")
CONFIGS = {"transformer": PRESETS["tiny"], "vae": VAE_PRESETS["tiny"], "umt5": umt5.PRESETS["tiny"]}


def contiguous(sd):
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def oracles():
    torch.manual_seed(0)
    wan, _ = random_diffusers(PRESETS["tiny"], seed=3)
    vae = diffusers_vae(VAE_PRESETS["tiny"]).eval()
    text = transformers.UMT5EncoderModel(hf_config(umt5.PRESETS["tiny"])).eval()
    return dict(transformer=wan, vae=vae, umt5=text)


def expected(oracles):
    """What our models must hold: every oracle's weights under our names."""
    return dict(
        transformer=wan_from_diffusers(oracles["transformer"].state_dict()),
        vae=wan_vae_from_diffusers(oracles["vae"].state_dict()),
        umt5=t5_keys(oracles["umt5"].state_dict()),
    )


def assert_weights(models, want: dict):
    for part, sd in want.items():
        ours = getattr(models, part).state_dict()
        assert ours.keys() == sd.keys(), part
        for k, v in sd.items():
            assert torch.equal(ours[k], v), f"{part}: {k}"


def test_original_layout(tmp_path, oracles, umt5_folder):  # noqa: F811
    """Wan-AI/Wan2.1-T2V-*: sharded diffusion_pytorch_model safetensors in Wan's names,
    Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth in Wan's names, google/umt5-xxl/."""
    want = expected(oracles)
    t = want["transformer"]
    keys = sorted(t)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = keys[half:]
    weight_map = {}
    for name, part in shards.items():
        save_file(contiguous({k: t[k] for k in part}), tmp_path / name)
        weight_map |= dict.fromkeys(part, name)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    torch.save(want["vae"], tmp_path / "Wan2.1_VAE.pth")
    torch.save(to_wan(want["umt5"]), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    (tmp_path / "google").mkdir()
    os.symlink(umt5_folder, tmp_path / "google" / "umt5-xxl")
    m = load_wan(tmp_path, configs=CONFIGS)
    assert_weights(m, want)
    assert m.tokenizer(["a photo"]).shape == (1, 512)


def test_diffusers_layout(tmp_path, oracles, umt5_folder):  # noqa: F811
    oracles["transformer"].save_pretrained(tmp_path / "transformer", max_shard_size="50KB")
    oracles["vae"].save_pretrained(tmp_path / "vae")
    oracles["umt5"].save_pretrained(tmp_path / "text_encoder")
    os.symlink(umt5_folder, tmp_path / "tokenizer")
    m = load_wan(tmp_path, configs=CONFIGS)
    assert_weights(m, expected(oracles))


def test_comfyui_files(tmp_path, oracles):
    want = expected(oracles)
    save_file(
        contiguous({f"model.diffusion_model.{k}": v for k, v in want["transformer"].items()}),
        tmp_path / "wan_t2v.safetensors",
    )
    save_file(contiguous(want["vae"]), tmp_path / "wan_vae.safetensors")
    fp16 = {k: v.half() for k, v in want["umt5"].items()}
    save_file(contiguous(fp16), tmp_path / "umt5_xxl_fp16.safetensors")
    m = load_wan(
        transformer=tmp_path / "wan_t2v.safetensors",
        vae=tmp_path / "wan_vae.safetensors",
        umt5=tmp_path / "umt5_xxl_fp16.safetensors",
        configs=CONFIGS,
        parts=("transformer", "vae", "umt5"),
    )
    want["umt5"] = {k: v.half().float() for k, v in want["umt5"].items()}
    assert_weights(m, want)


def test_bad_inputs(tmp_path, oracles):
    want = expected(oracles)
    # a FLUX file offered as Wan
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}
    save_file(flux, tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match=r"holds a 'flux' model.*Wan transformer"):
        load_wan_transformer(tmp_path / "flux.safetensors", config=CONFIGS["transformer"])
    # a Wan transformer offered as the VAE
    save_file(contiguous(want["transformer"]), tmp_path / "wan.safetensors")
    with pytest.raises(CheckpointError, match=r"holds a 'wan' model.*Wan VAE"):
        load_wan_vae(tmp_path / "wan.safetensors", config=CONFIGS["vae"])
    # missing key and shape mismatch, named
    sd = dict(want["umt5"])
    del sd["encoder.final_layer_norm.weight"]
    sd["shared.weight"] = torch.zeros(3, 3)
    save_file(contiguous(sd), tmp_path / "umt5.safetensors")
    with pytest.raises(CheckpointError, match="final_layer_norm.weight") as e:
        load_umt5(tmp_path / "umt5.safetensors", config=CONFIGS["umt5"])
    assert "shared.weight: file (3, 3)" in str(e.value)
    # truncated transformer file
    data = (tmp_path / "wan.safetensors").read_bytes()
    (tmp_path / "wan.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_wan_transformer(tmp_path / "wan.safetensors", config=CONFIGS["transformer"])


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_vae_pickle_is_refused(tmp_path, oracles):
    sd = dict(expected(oracles)["vae"])
    marker = tmp_path / "code-ran"
    torch.save({**sd, "evil": Payload(marker)}, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_wan_vae(tmp_path / "Wan2.1_VAE.pth", config=CONFIGS["vae"])
    assert not marker.exists()


def test_umt5_wan_names_map(oracles):
    """Wan's .pth names reach ours through the one key map."""
    want = expected(oracles)["umt5"]
    assert umt5_from_wan(to_wan(want)).keys() == want.keys()
