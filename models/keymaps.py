"""Every rename between a checkpoint format and our module names, one function per model.

Our modules carry the original checkpoint names (BFL for FLUX and its autoencoder,
transformers for CLIP and T5), so those files load with no renaming. Other formats
pass through the functions here, and nowhere else, on their way in. Each takes a state
dict and returns a new one; tensors are sliced or concatenated, never copied needlessly.
"""

import re

import torch

# ---------------------------------------------------------------------------------------
# FLUX transformer: diffusers FluxTransformer2DModel -> BFL flux
# ---------------------------------------------------------------------------------------

# plain renames: diffusers name -> BFL name, with N the block index
_FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_FLUX_SINGLE = {
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
    "norm.linear": "modulation.lin",
}
# fused BFL weights: BFL name -> the diffusers parts concatenated along dim 0, in order
_FLUX_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_FLUX_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def _param(name: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _leaf_bfl(module_bfl: str, leaf: str) -> str:
    # RMSNorm weights are called `scale` in BFL's QK norm
    if module_bfl.endswith(("query_norm", "key_norm")) and leaf == "weight":
        leaf = "scale"
    return f"{module_bfl}.{leaf}"


def flux_from_diffusers(sd: dict) -> dict:
    """diffusers FluxTransformer2DModel keys -> BFL keys.

    Three things are not renames: q, k, v (and in single blocks the MLP input) are fused
    into one weight along dim 0; and the final layer's modulation is stored (scale,
    shift) by diffusers but (shift, scale) by BFL, so its halves swap.
    """
    out, parts = {}, {}
    for name, t in sd.items():
        module, leaf = _param(name)
        m = _FLUX_BLOCK.match(module)
        if module == "norm_out.linear":
            scale, shift = t.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale], dim=0)
        elif module in _FLUX_TOP:
            out[f"{_FLUX_TOP[module]}.{leaf}"] = t
        elif m is not None:
            kind, n, sub = m.groups()
            prefix = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
            renames = _FLUX_DOUBLE if prefix == "double_blocks" else _FLUX_SINGLE
            if sub in renames:
                out[_leaf_bfl(f"{prefix}.{n}.{renames[sub]}", leaf)] = t
            else:  # a part of a fused weight; an unknown name passes through unchanged
                parts[(prefix, n, sub, leaf)] = t
        else:
            out[name] = t  # unknown: left for the strict loader to name
    fused_by_prefix = {"double_blocks": _FLUX_DOUBLE_FUSED, "single_blocks": _FLUX_SINGLE_FUSED}
    done = set()
    for prefix, n, _, leaf in sorted(parts):
        for target, pieces in fused_by_prefix[prefix].items():
            keys = [(prefix, n, p, leaf) for p in pieces]
            if keys[0] in done or not all(k in parts for k in keys):
                continue
            out[f"{prefix}.{n}.{target}.{leaf}"] = torch.cat([parts[k] for k in keys], dim=0)
            done.update(keys)
    for key in parts.keys() - done:  # an incomplete or unknown part: keep its own name
        prefix, n, sub, leaf = key
        kind = "transformer_blocks" if prefix == "double_blocks" else "single_transformer_blocks"
        out[f"{kind}.{n}.{sub}.{leaf}"] = parts[key]
    return out


def is_diffusers_flux(sd: dict) -> bool:
    return any(k.startswith(("transformer_blocks.", "x_embedder.")) for k in sd)


# ---------------------------------------------------------------------------------------
# FLUX autoencoder: diffusers AutoencoderKL -> BFL ae
# ---------------------------------------------------------------------------------------

_AE_RESNET = {"conv_shortcut": "nin_shortcut"}
_AE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def ae_from_diffusers(sd: dict, levels: int = 4) -> dict:
    """diffusers AutoencoderKL keys -> BFL autoencoder keys.

    The decoder's up blocks are numbered in reverse (diffusers up_blocks.i is BFL
    up.(levels-1-i)); attention projections are 1x1 convs in BFL and linears in diffusers.
    """
    out = {}
    for name, t in sd.items():
        new = name
        new = re.sub(r"\.conv_norm_out\.", ".norm_out.", new)
        new = re.sub(r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block.", new)
        new = re.sub(r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample.", new)

        def up(m, suffix):
            return f".up.{levels - 1 - int(m.group(1))}.{suffix}."

        new = re.sub(r"\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m, "block"), new)
        new = re.sub(r"\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m, "upsample"), new)
        new = re.sub(r"\.mid_block\.resnets\.0\.", ".mid.block_1.", new)
        new = re.sub(r"\.mid_block\.resnets\.1\.", ".mid.block_2.", new)
        m = re.match(r"^(.*)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new)
        if m is not None:
            head, sub, leaf = m.groups()
            new = f"{head}.mid.attn_1.{_AE_ATTN.get(sub, sub)}.{leaf}"
            if leaf == "weight" and sub != "group_norm" and t.ndim == 2:
                t = t[:, :, None, None]  # linear -> 1x1 conv
        for a, b in _AE_RESNET.items():
            new = new.replace(f".{a}.", f".{b}.")
        out[new] = t
    return out


def is_diffusers_ae(sd: dict) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k for k in sd)


# ---------------------------------------------------------------------------------------
# CLIP text encoder: transformers names, with or without the `text_model.` prefix
# ---------------------------------------------------------------------------------------


def clip_keys(sd: dict) -> dict:
    """Adds `text_model.` where a file left it out; drops the position_ids buffer."""
    out = {}
    for name, t in sd.items():
        if name.endswith("position_ids"):
            continue
        if not name.startswith("text_model.") and name.split(".")[0] in (
            "embeddings",
            "encoder",
            "final_layer_norm",
        ):
            name = "text_model." + name
        out[name] = t
    return out


# ---------------------------------------------------------------------------------------
# T5 encoder: transformers names; the tied embedding under either name
# ---------------------------------------------------------------------------------------


def t5_keys(sd: dict) -> dict:
    """The token embedding is stored as `shared.weight`, `encoder.embed_tokens.weight`
    or both (tied); ours is `shared.weight`. Decoder-only keys are not ours to accept."""
    out = dict(sd)
    tied = out.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in out and tied is not None:
        out["shared.weight"] = tied
    return out


# ---------------------------------------------------------------------------------------
# Wan2.1 transformer: diffusers WanTransformer3DModel -> original Wan names
# ---------------------------------------------------------------------------------------


def wan_from_diffusers(sd: dict) -> dict:
    """diffusers WanTransformer3DModel keys -> original Wan2.1 keys (REFERENCE.md D)."""
    raise NotImplementedError("Wan transformer key map: not written yet")


def is_diffusers_wan(sd: dict) -> bool:
    return any(k.startswith("condition_embedder.") for k in sd)


# ---------------------------------------------------------------------------------------
# Wan VAE: diffusers AutoencoderKLWan -> original Wan2.1_VAE.pth names
# ---------------------------------------------------------------------------------------


def wan_vae_from_diffusers(sd: dict) -> dict:
    """diffusers AutoencoderKLWan keys -> original Wan VAE keys (REFERENCE.md E)."""
    raise NotImplementedError("Wan VAE key map: not written yet")


# ---------------------------------------------------------------------------------------
# umT5 encoder: Wan's original .pth names -> transformers UMT5EncoderModel names
# ---------------------------------------------------------------------------------------


def umt5_from_wan(sd: dict) -> dict:
    """Wan's models_t5_umt5-xxl-enc-bf16.pth keys -> transformers UMT5 keys (REFERENCE E)."""
    raise NotImplementedError("umT5 key map: not written yet")
