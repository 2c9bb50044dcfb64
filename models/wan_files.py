"""Wan2.1 T2V from the files a user has: an original or a diffusers snapshot, or files.

    models = load_wan("Wan2.1-T2V-1.3B/")              # original layout
    models = load_wan("Wan2.1-T2V-1.3B-Diffusers/")    # diffusers layout
    models = load_wan(transformer="wan2.1_t2v_1.3B_bf16.safetensors",   # ComfyUI repack
                      vae="wan_2.1_vae.safetensors", umt5="umt5_xxl_fp16.safetensors",
                      tokenizer="Wan2.1-T2V-1.3B/google/umt5-xxl")

Accepted for each part:
    transformer  original diffusion_pytorch_model*.safetensors (sharded with an index);
                 diffusers transformer/; ComfyUI files (`model.diffusion_model.` prefix)
    vae          Wan2.1_VAE.pth (a pickle: weights_only loading only); diffusers vae/;
                 safetensors repacks with the original names
    umt5         models_t5_umt5-xxl-enc-bf16.pth (Wan's names, weights_only); diffusers
                 text_encoder/ (transformers' UMT5 names); safetensors repacks
    tokenizer    a folder with spiece.model or tokenizer.json (google/umt5-xxl)
"""

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from models import keymaps
from models.loading import (
    COMFY_TRANSFORMER_PREFIXES,
    CheckpointError,
    build,
    count_blocks,
    default_dtype,
    dequantize_fp8,
    expect_family,
    first_match,
    read_checkpoint,
    strip_prefix,
)
from models.wan import PRESETS, Wan, WanConfig


def wan_state_dict(sd: dict, source="state dict") -> dict:
    """Any supported Wan transformer state dict -> original Wan keys."""
    sd = strip_prefix(sd, COMFY_TRANSFORMER_PREFIXES)
    family = expect_family(sd, ("wan", "wan-diffusers"), source, "Wan transformer")
    sd = dequantize_fp8(sd)
    return keymaps.wan_from_diffusers(sd) if family == "wan-diffusers" else sd


def wan_config_of(sd: dict) -> WanConfig:
    """A preset when the shapes are one; else the sizes read from the shapes, with
    head_dim 128 (the head count is not stored in the weights)."""
    try:
        dim, in_dim = sd["patch_embedding.weight"].shape[:2]
        found = dict(
            in_dim=in_dim,
            dim=dim,
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
            freq_dim=sd["time_embedding.0.weight"].shape[1],
            text_dim=sd["text_embedding.0.weight"].shape[1],
            num_layers=count_blocks(sd, "blocks"),
        )
        patch = tuple(sd["patch_embedding.weight"].shape[2:])
        found["out_dim"] = sd["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2])
    except KeyError as e:
        raise CheckpointError(f"Wan transformer checkpoint lacks {e.args[0]}") from None
    for config in PRESETS.values():
        if all(getattr(config, k) == v for k, v in found.items()) and config.patch_size == patch:
            return config
    return replace(PRESETS["wan-t2v-1.3b"], patch_size=patch, num_heads=dim // 128, **found)


def load_wan_transformer(source, *, config=None, device="cpu", dtype=None, sd=None) -> Wan:
    sd = wan_state_dict(read_checkpoint(source) if sd is None else sd, source)
    config = config or wan_config_of(sd)
    dtype = dtype or default_dtype(device)
    return build(lambda: Wan(config), sd, device=device, dtype=dtype, what="Wan transformer")


def load_wan_vae(source, *, config=None, device="cpu", dtype=None, sd=None) -> nn.Module:
    from models.wan_vae import PRESETS as VAE_PRESETS
    from models.wan_vae import WanVAE

    sd = strip_prefix(read_checkpoint(source) if sd is None else sd, ("first_stage_model.", "vae."))
    family = expect_family(sd, ("wan-vae", "wan-vae-diffusers"), source, "Wan VAE")
    if family == "wan-vae-diffusers":
        sd = keymaps.wan_vae_from_diffusers(sd)
    config = config or VAE_PRESETS["wan2.1"]
    dtype = dtype or default_dtype(device)
    return build(lambda: WanVAE(config), dequantize_fp8(sd), device=device, dtype=dtype,
                 what="Wan VAE")  # fmt: skip


def load_umt5(source, *, config=None, device="cpu", dtype=None, sd=None) -> nn.Module:
    from models.umt5 import PRESETS as UMT5_PRESETS
    from models.umt5 import UMT5Encoder

    sd = read_checkpoint(source) if sd is None else sd
    family = expect_family(sd, ("umt5", "umt5-wan"), source, "umT5 encoder")
    if family == "umt5-wan":
        sd = keymaps.umt5_from_wan(sd)
    sd = keymaps.t5_keys(dequantize_fp8(sd))
    config = config or UMT5_PRESETS["umt5-xxl"]
    dtype = dtype or default_dtype(device)
    return build(lambda: UMT5Encoder(config), sd, device=device, dtype=dtype, what="umT5-XXL")


@dataclass
class WanModels:
    transformer: Wan | None = None
    vae: nn.Module | None = None
    umt5: nn.Module | None = None
    tokenizer: object = None


def snapshot_parts(folder) -> dict:
    """Where each part lives in an original (top-level files) or diffusers snapshot."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")

    def sub(name):
        return folder / name if (folder / name).is_dir() else None

    transformer = sub("transformer")
    if transformer is None and any(folder.glob("diffusion_pytorch_model*.safetensors")):
        index = first_match(folder, "diffusion_pytorch_model*.index.json")
        transformer = index or first_match(folder, "diffusion_pytorch_model*.safetensors")
    tokenizer = sub("tokenizer") or first_match(folder, "google/umt5-xxl")
    return {
        "transformer": transformer,
        "vae": sub("vae") or first_match(folder, "Wan2.1_VAE.pth", "*vae*.safetensors"),
        "umt5": sub("text_encoder") or first_match(folder, "models_t5_umt5-xxl-enc-*.pth"),
        "tokenizer": tokenizer,
    }


def load_wan(
    snapshot=None,
    *,
    transformer=None,
    vae=None,
    umt5=None,
    tokenizer=None,
    device="cpu",
    dtype: torch.dtype | None = None,
    parts=("transformer", "vae", "umt5", "tokenizer"),
    configs: dict | None = None,
) -> WanModels:
    """Ready Wan2.1 T2V models from a snapshot folder and/or individual files (keyword
    arguments override the snapshot's). `configs` overrides presets per part ("transformer",
    "vae", "umt5"), for tiny test checkpoints; the tokenizer pads to 512 tokens."""
    found = snapshot_parts(snapshot) if snapshot is not None else {}
    given = dict(transformer=transformer, vae=vae, umt5=umt5, tokenizer=tokenizer)
    where = {k: v or found.get(k) for k, v in given.items()}
    configs = configs or {}
    kw = dict(device=device, dtype=dtype or default_dtype(device))
    out = WanModels()
    loaders = dict(transformer=load_wan_transformer, vae=load_wan_vae, umt5=load_umt5)
    for part, loader in loaders.items():
        if part not in parts:
            continue
        if where[part] is None:
            raise CheckpointError(f"no Wan {part} checkpoint: pass a snapshot folder or {part}=")
        setattr(out, part, loader(where[part], config=configs.get(part), **kw))
    if "tokenizer" in parts:
        from models.tokenizers import T5Tokenizer

        if where["tokenizer"] is None:
            raise CheckpointError("no umT5 tokenizer folder: pass a snapshot or tokenizer=")
        out.tokenizer = T5Tokenizer.from_folder(where["tokenizer"], max_length=512)
    return out
