"""Bad checkpoints are clear CheckpointErrors that name the problem, never a crash deep
inside torch or safetensors; and a pickle carrying code is refused without running it."""

import os

import pytest
import torch
from safetensors.torch import save_file

from models.flux import PRESETS, Flux
from models.flux_files import load_flux_transformer
from models.loading import (
    CheckpointError,
    dequantize_fp8,
    detect_family,
    read_checkpoint,
    read_pickle,
    split_bundle,
)

TINY = PRESETS["tiny"]


def tiny_bfl(seed=0) -> dict:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in Flux(TINY).state_dict().items()}


@pytest.fixture
def bfl_file(tmp_path):
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(tiny_bfl(), path)
    return path


def test_good_file_loads(bfl_file):
    model = load_flux_transformer(bfl_file, config=TINY)
    ref = tiny_bfl()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_truncated_safetensors(bfl_file, keep):
    data = bfl_file.read_bytes()
    n = int(len(data) * keep) if keep < 1 else keep
    bfl_file.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="truncated|not a safetensors"):
        load_flux_transformer(bfl_file, config=TINY)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_checkpoint(path)


def test_wrong_family(tmp_path):
    """A Wan transformer (original names) offered as FLUX is named as what it is."""
    wan = {
        "patch_embedding.weight": torch.zeros(8, 4, 1, 2, 2),
        "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
        "blocks.0.self_attn.q.bias": torch.zeros(8),
        "head.head.weight": torch.zeros(16, 8),
    }
    save_file(wan, tmp_path / "wan.safetensors")
    with pytest.raises(CheckpointError, match=r"holds a 'wan' model.*FLUX transformer"):
        load_flux_transformer(tmp_path / "wan.safetensors", config=TINY)


def test_unknown_keys(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint.*foo.weight"):
        load_flux_transformer(tmp_path / "x.safetensors", config=TINY)


def test_missing_keys_are_named(tmp_path):
    sd = tiny_bfl()
    del sd["single_blocks.1.linear2.weight"], sd["final_layer.linear.bias"]
    save_file(sd, tmp_path / "f.safetensors")
    with pytest.raises(CheckpointError, match="2 missing") as e:
        load_flux_transformer(tmp_path / "f.safetensors", config=TINY)
    assert "single_blocks.1.linear2.weight" in str(e.value)
    assert "final_layer.linear.bias" in str(e.value)


def test_unexpected_keys_are_named(tmp_path):
    sd = tiny_bfl()
    sd["double_blocks.0.img_attn.extra.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "f.safetensors")
    with pytest.raises(CheckpointError, match="1 unexpected: double_blocks.0.img_attn.extra"):
        load_flux_transformer(tmp_path / "f.safetensors", config=TINY)


def test_shape_mismatch_is_named(tmp_path):
    sd = tiny_bfl()
    sd["txt_in.weight"] = torch.zeros(32, 65)
    save_file(sd, tmp_path / "f.safetensors")
    with pytest.raises(CheckpointError, match=r"txt_in.weight: file \(32, 65\), model \(32, 64\)"):
        load_flux_transformer(tmp_path / "f.safetensors", config=TINY)


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"weight": torch.zeros(2), "evil": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
    # the same file through torch.load without weights_only would run it: the test is real
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_plain_tensor_pickle_loads(tmp_path):
    torch.save({"a": torch.arange(3)}, tmp_path / "ok.pth")
    assert torch.equal(read_pickle(tmp_path / "ok.pth")["a"], torch.arange(3))


def test_truncated_pickle(tmp_path):
    torch.save({"a": torch.zeros(1000)}, tmp_path / "t.pth")
    data = (tmp_path / "t.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable torch file"):
        read_checkpoint(tmp_path / "t.pth")


def test_folders_and_indexes(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        read_checkpoint(tmp_path / "empty")
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "m.safetensors.index.json").write_text(
        '{"weight_map": {"a": "m-00001.safetensors", "b": "m-00002.safetensors"}}'
    )
    save_file({"a": torch.zeros(1)}, shard / "m-00001.safetensors")
    with pytest.raises(CheckpointError, match="absent.*m-00002"):
        read_checkpoint(shard)
    save_file({"a": torch.zeros(1)}, shard / "m-00002.safetensors")
    with pytest.raises(CheckpointError, match="also found in another file: a"):
        read_checkpoint(shard)


def test_bundle_split_and_scaled_fp8():
    sd = {
        "model.diffusion_model.img_in.weight": torch.ones(1),
        "first_stage_model.decoder.conv_in.weight": torch.ones(1),
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(1),
        "text_encoders.t5xxl.transformer.shared.weight": torch.ones(1),
    }
    parts = split_bundle(sd)
    assert set(parts) == {"transformer", "ae", "clip", "t5"}
    assert list(parts["clip"]) == ["text_model.final_layer_norm.weight"]
    w = torch.tensor([1.0, -2.0]).to(torch.float8_e4m3fn)
    scaled = {"l.weight": w, "l.scale_weight": torch.tensor(0.5), "scaled_fp8": torch.zeros(0)}
    out = dequantize_fp8(scaled)
    assert set(out) == {"l.weight"}
    assert torch.equal(out["l.weight"], torch.tensor([0.5, -1.0]))


def test_detect_family_names_what_it_sees():
    with torch.device("meta"):
        sd = Flux(TINY).state_dict()
    assert detect_family(sd) == "flux"
    assert detect_family({"decoder.up.0.block.0.conv1.weight": torch.zeros(1, 1, 3, 3)}) == (
        "flux-ae"
    )
    assert detect_family({"decoder.head.0.gamma": torch.zeros(1)}) == "wan-vae"
    assert detect_family({"blocks.0.attn1.to_q.weight": torch.zeros(1)}) == "wan-diffusers"
