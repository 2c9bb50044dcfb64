"""FLUX.1 from the files a user has: a snapshot folder, or the files one by one.

    models = load_flux("FLUX.1-dev/")                    # a Hugging Face snapshot
    models = load_flux(transformer="flux1-dev-fp8.safetensors", ae="ae.safetensors",
                       clip="clip_l.safetensors", t5="t5xxl_fp16.safetensors",
                       tokenizers="FLUX.1-dev/")         # ComfyUI-style single files

Accepted for each part:
    transformer  BFL flux1-*.safetensors; diffusers transformer/ (sharded, index.json);
                 ComfyUI files with the `model.diffusion_model.` prefix; fp8 storage
    ae           BFL ae.safetensors; diffusers vae/
    clip         transformers text_encoder/ or clip_l.safetensors (with or without
                 the `text_model.` prefix)
    t5           transformers text_encoder_2/ (sharded) or t5xxl_fp16 / fp8 files
    tokenizers   a folder holding tokenizer/ and tokenizer_2/ (or those folders' files)

The variant (dev or schnell) is read from the transformer's keys: dev has guidance_in.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from models import keymaps
from models.flux import PRESETS, Flux, FluxConfig
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
    split_bundle,
    strip_prefix,
)

# ---------------------------------------------------------------------------------------
# the transformer
# ---------------------------------------------------------------------------------------


def flux_state_dict(sd: dict, source="state dict") -> dict:
    """Any supported FLUX transformer state dict -> BFL keys."""
    sd = strip_prefix(sd, COMFY_TRANSFORMER_PREFIXES)
    family = expect_family(sd, ("flux", "flux-diffusers"), source, "FLUX transformer")
    sd = dequantize_fp8(sd)
    return keymaps.flux_from_diffusers(sd) if family == "flux-diffusers" else sd


def flux_config_of(sd: dict) -> FluxConfig:
    """The config a BFL-keyed state dict was made for: a preset when its shapes are one,
    else the preset's structure with the sizes read from the shapes (head_dim 128 only:
    RoPE's axes split cannot be read from weights)."""
    try:
        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        found = dict(
            in_channels=in_channels,
            out_channels=sd["final_layer.linear.weight"].shape[0],
            vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
            context_in_dim=sd["txt_in.weight"].shape[1],
            hidden_size=hidden,
            mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
            num_heads=hidden // head_dim,
            depth=count_blocks(sd, "double_blocks"),
            depth_single_blocks=count_blocks(sd, "single_blocks"),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
            guidance_embed="guidance_in.in_layer.weight" in sd,
        )
    except KeyError as e:
        raise CheckpointError(f"FLUX transformer checkpoint lacks {e.args[0]}") from None
    base = PRESETS["flux-dev" if found["guidance_embed"] else "flux-schnell"]
    if head_dim != base.head_dim:
        raise CheckpointError(
            f"FLUX transformer with head_dim {head_dim}: pass its FluxConfig (config=...)"
        )
    return replace(base, **found)


def load_flux_transformer(
    source, *, config: FluxConfig | None = None, device="cpu", dtype=None, sd=None
) -> Flux:
    """A BFL file, diffusers folder, ComfyUI file or sharded checkpoint -> Flux."""
    sd = flux_state_dict(read_checkpoint(source) if sd is None else sd, source)
    config = config or flux_config_of(sd)
    dtype = dtype or default_dtype(device)
    return build(lambda: Flux(config), sd, device=device, dtype=dtype, what="FLUX transformer")


def variant_of(model: Flux) -> str:
    return "flux-dev" if model.config.guidance_embed else "flux-schnell"


# ---------------------------------------------------------------------------------------
# the other parts
# ---------------------------------------------------------------------------------------


def load_flux_ae(source, *, config=None, device="cpu", dtype=None, sd=None) -> nn.Module:
    from models.autoencoder import PRESETS as AE_PRESETS
    from models.autoencoder import AutoEncoder

    sd = strip_prefix(read_checkpoint(source) if sd is None else sd, ("first_stage_model.", "vae."))
    family = expect_family(sd, ("flux-ae", "flux-ae-diffusers"), source, "FLUX autoencoder")
    config = config or AE_PRESETS["flux"]
    if family == "flux-ae-diffusers":
        sd = keymaps.ae_from_diffusers(sd, levels=len(config.ch_mult))
    dtype = dtype or default_dtype(device)
    return build(lambda: AutoEncoder(config), sd, device=device, dtype=dtype, what="FLUX AE")


def load_clip(source, *, config=None, device="cpu", dtype=None, sd=None) -> nn.Module:
    from models.clip import PRESETS as CLIP_PRESETS
    from models.clip import CLIPTextEncoder

    sd = read_checkpoint(source) if sd is None else sd
    sd = strip_prefix(sd, ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer."))
    expect_family(sd, ("clip",), source, "CLIP text encoder")
    sd = keymaps.clip_keys(dequantize_fp8(sd))
    config = config or CLIP_PRESETS["clip-l"]
    dtype = dtype or default_dtype(device)
    return build(lambda: CLIPTextEncoder(config), sd, device=device, dtype=dtype, what="CLIP-L")


def load_t5(source, *, config=None, device="cpu", dtype=None, sd=None) -> nn.Module:
    from models.t5 import PRESETS as T5_PRESETS
    from models.t5 import T5Encoder

    sd = read_checkpoint(source) if sd is None else sd
    sd = strip_prefix(sd, ("text_encoders.t5xxl.transformer.",))
    expect_family(sd, ("t5",), source, "T5 encoder")
    sd = keymaps.t5_keys(dequantize_fp8(sd))
    config = config or T5_PRESETS["t5-xxl"]
    dtype = dtype or default_dtype(device)
    return build(lambda: T5Encoder(config), sd, device=device, dtype=dtype, what="T5-XXL")


# ---------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------


@dataclass
class FluxModels:
    variant: str  # "flux-dev" or "flux-schnell"
    transformer: Flux | None = None
    ae: nn.Module | None = None
    clip: nn.Module | None = None
    t5: nn.Module | None = None
    clip_tokenizer: object = None
    t5_tokenizer: object = None


def snapshot_parts(folder) -> dict:
    """Where each part lives in a FLUX.1 snapshot: BFL single files at the top level
    (flux1-*.safetensors, ae.safetensors) are preferred over diffusers subfolders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")

    def sub(name):
        return folder / name if (folder / name).is_dir() else None

    return {
        "transformer": first_match(folder, "flux1-*.safetensors") or sub("transformer"),
        "ae": first_match(folder, "ae.safetensors") or sub("vae"),
        "clip": sub("text_encoder"),
        "t5": sub("text_encoder_2"),
        "clip_tokenizer": sub("tokenizer"),
        "t5_tokenizer": sub("tokenizer_2"),
    }


def load_flux(
    snapshot=None,
    *,
    transformer=None,
    ae=None,
    clip=None,
    t5=None,
    tokenizers=None,
    device="cpu",
    dtype: torch.dtype | None = None,
    parts=("transformer", "ae", "clip", "t5", "tokenizers"),
    configs: dict | None = None,
    variant: str | None = None,
) -> FluxModels:
    """Ready FLUX.1 models from a snapshot folder and/or individual files.

    Files given by keyword override the snapshot's. A single file holding several
    models (ComfyUI "checkpoint" bundles) may be passed as `transformer`; its AE and
    text encoders are taken from it when not given otherwise. `parts` picks what to
    load (e.g. parts=("transformer",)); `configs` overrides the presets per part
    (keys "transformer", "ae", "clip", "t5"), for tiny test checkpoints.

    variant ("flux-dev" / "flux-schnell") sets the T5 length (512 / 256) when the
    transformer is not among `parts` (e.g. text encoders loaded and freed first); with
    the transformer it must agree with the weights. Without either, a CheckpointError."""
    if variant is not None and variant not in ("flux-dev", "flux-schnell"):
        raise ValueError(f"variant must be 'flux-dev' or 'flux-schnell', got {variant!r}")
    found = snapshot_parts(snapshot) if snapshot is not None else {}
    given = dict(transformer=transformer, ae=ae, clip=clip, t5=t5)
    where = {k: given[k] or found.get(k) for k in given}
    if tokenizers is not None:
        tok = Path(tokenizers)
        where["clip_tokenizer"] = tok / "tokenizer" if (tok / "tokenizer").is_dir() else tok
        where["t5_tokenizer"] = tok / "tokenizer_2" if (tok / "tokenizer_2").is_dir() else tok
    else:
        where["clip_tokenizer"] = found.get("clip_tokenizer")
        where["t5_tokenizer"] = found.get("t5_tokenizer")
    configs = configs or {}
    dtype = dtype or default_dtype(device)
    kw = dict(device=device, dtype=dtype)

    bundle: dict = {}
    if "transformer" in parts:
        if where["transformer"] is None:
            raise CheckpointError("no FLUX transformer: pass a snapshot folder or transformer=")
        sd = read_checkpoint(where["transformer"])
        bundle = split_bundle(sd)
        if len(bundle) > 1 or "transformer" in bundle:  # a bundle (or a prefixed file)
            sd = bundle.get("transformer", bundle.get(None, {}))
    out = FluxModels(variant=variant or "")
    if "transformer" in parts:
        out.transformer = load_flux_transformer(
            where["transformer"], config=configs.get("transformer"), sd=sd, **kw
        )
        found_variant = variant_of(out.transformer)
        if variant is not None and variant != found_variant:
            raise CheckpointError(f"variant={variant!r}, but the transformer is {found_variant}")
        out.variant = found_variant
    loaders = dict(ae=load_flux_ae, clip=load_clip, t5=load_t5)
    for part, loader in loaders.items():
        if part not in parts:
            continue
        if where[part] is None and part not in bundle:
            raise CheckpointError(f"no {part} checkpoint: pass a snapshot folder or {part}=")
        source = where[part] or where["transformer"]
        sd = bundle[part] if where[part] is None else None
        setattr(out, part, loader(source, config=configs.get(part), sd=sd, **kw))
    if "tokenizers" in parts:
        out.clip_tokenizer, out.t5_tokenizer = load_flux_tokenizers(
            where["clip_tokenizer"], where["t5_tokenizer"], _need_variant(out.variant)
        )
    return out


def load_flux_tokenizers(clip_folder, t5_folder, variant: str):
    from models.tokenizers import CLIPTokenizer, T5Tokenizer

    if clip_folder is None or t5_folder is None:
        raise CheckpointError(
            "no tokenizer files: pass a snapshot folder or tokenizers= (a folder with "
            "tokenizer/ and tokenizer_2/)"
        )
    t5_length = PRESETS[variant].t5_length
    return CLIPTokenizer.from_folder(clip_folder), T5Tokenizer.from_folder(
        t5_folder, max_length=t5_length
    )


def _need_variant(variant: str) -> str:
    if not variant:
        raise CheckpointError(
            "the T5 length depends on the model (dev 512, schnell 256): load the transformer "
            "too, or pass variant='flux-dev' or 'flux-schnell'"
        )
    return variant
