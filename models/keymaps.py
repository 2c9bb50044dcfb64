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
FLUX_TOP = {
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
FLUX_DOUBLE = {
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
FLUX_SINGLE = {
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
    "norm.linear": "modulation.lin",
}
# fused BFL weights: BFL name -> the diffusers parts concatenated along dim 0, in order
FLUX_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
FLUX_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


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
        m = FLUX_BLOCK.match(module)
        if module == "norm_out.linear":
            scale, shift = t.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale], dim=0)
        elif module in FLUX_TOP:
            out[f"{FLUX_TOP[module]}.{leaf}"] = t
        elif m is not None:
            kind, n, sub = m.groups()
            prefix = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
            renames = FLUX_DOUBLE if prefix == "double_blocks" else FLUX_SINGLE
            if sub in renames:
                out[_leaf_bfl(f"{prefix}.{n}.{renames[sub]}", leaf)] = t
            else:  # a part of a fused weight; an unknown name passes through unchanged
                parts[(prefix, n, sub, leaf)] = t
        else:
            out[name] = t  # unknown: left for the strict loader to name
    fused_by_prefix = {"double_blocks": FLUX_DOUBLE_FUSED, "single_blocks": FLUX_SINGLE_FUSED}
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
    """diffusers WanTransformer3DModel keys -> original Wan2.1 keys (REFERENCE.md D).

    Renames only. Two are easy to get wrong: diffusers' `norm2` is the affine LayerNorm
    before the cross-attention, the original `norm3` (the original norm1 / norm2 have no
    weights); and `scale_shift_table` is `modulation` in a block but `head.modulation`
    at the top. Unknown keys (I2V's image embedder, added k / v) pass through unchanged
    for the strict loader to name.
    """
    top = {
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "proj_out": "head.head",
    }
    block = {"norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
    for attn, ours in [("attn1", "self_attn"), ("attn2", "cross_attn")]:
        block.update({f"{attn}.to_{p}": f"{ours}.{p}" for p in "qkv"})
        block.update({f"{attn}.norm_{p}": f"{ours}.norm_{p}" for p in "qk"})
        block[f"{attn}.to_out.0"] = f"{ours}.o"
    out = {}
    for name, t in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        module, leaf = _param(name if m is None else m.group(2))
        if name == "scale_shift_table":
            out["head.modulation"] = t
        elif m is None:
            out[f"{top[module]}.{leaf}" if module in top else name] = t
        elif m.group(2) == "scale_shift_table":
            out[f"blocks.{m.group(1)}.modulation"] = t
        else:
            out[f"blocks.{m.group(1)}.{block[module]}.{leaf}" if module in block else name] = t
    return out


def is_diffusers_wan(sd: dict) -> bool:
    return any(k.startswith(("condition_embedder.", "blocks.0.attn1.")) for k in sd)


# ---------------------------------------------------------------------------------------
# Wan VAE: diffusers AutoencoderKLWan -> original Wan2.1_VAE.pth names
# ---------------------------------------------------------------------------------------


def wan_vae_from_diffusers(sd: dict) -> dict:
    """diffusers AutoencoderKLWan keys -> original Wan VAE keys (REFERENCE.md E).

    Both sides hold the same tensors under other names. Wan keeps each resnet as one
    Sequential `residual` (0 norm, 2 conv, 3 norm, 6 conv) and the encoder's and
    decoder's blocks as flat lists (`downsamples.N`, `upsamples.N`); diffusers' encoder
    list is flat too (`down_blocks.N`), its decoder groups by level (`up_blocks.i`: the
    resnets, then one upsampler), so N = i * per_level + j, with per_level read off the
    keys. quant_conv / post_quant_conv are Wan's conv1 / conv2."""
    resnet = {
        "norm1": "residual.0",
        "conv1": "residual.2",
        "norm2": "residual.3",
        "conv2": "residual.6",
        "conv_shortcut": "shortcut",
    }
    js = {int(m[1]) for k in sd if (m := re.search(r"\.up_blocks\.\d+\.resnets\.(\d+)\.", k))}
    per_level = len(js) + 1  # num_res_blocks + 1 resnets and an upsampler

    def upsample(i: str, j: int) -> str:
        return f"decoder.upsamples.{int(i) * per_level + j}."

    out = {}
    for name, t in sd.items():
        # inside a resnet first, while its parent still says it is one
        new = re.sub(
            r"((?:down_blocks|resnets)\.\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.",
            lambda m: f"{m[1]}.{resnet[m[2]]}.",
            name,
        )
        new = re.sub(r"^quant_conv\.", "conv1.", new)
        new = re.sub(r"^post_quant_conv\.", "conv2.", new)
        new = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", new)
        new = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", new)
        new = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", new)
        new = re.sub(r"\.mid_block\.resnets\.0\.", ".middle.0.", new)
        new = re.sub(r"\.mid_block\.attentions\.0\.", ".middle.1.", new)
        new = re.sub(r"\.mid_block\.resnets\.1\.", ".middle.2.", new)
        new = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", new)
        up = r"^decoder\.up_blocks\.(\d+)\."
        new = re.sub(up + r"resnets\.(\d+)\.", lambda m: upsample(m[1], int(m[2])), new)
        new = re.sub(up + r"upsamplers\.0\.", lambda m: upsample(m[1], per_level - 1), new)
        out[new] = t
    return out


# ---------------------------------------------------------------------------------------
# umT5 encoder: Wan's original .pth names -> transformers UMT5EncoderModel names
# ---------------------------------------------------------------------------------------


def umt5_from_wan(sd: dict) -> dict:
    """Wan's models_t5_umt5-xxl-enc-bf16.pth keys -> transformers UMT5 keys (REFERENCE E).

    Plain renames, 242 keys at full size: the embedding, 10 per block, the final norm.
    Wan's block (wan/modules/t5.py T5SelfAttention) is norm1, attn.{q,k,v,o}, norm2,
    ffn = fc2(fc1(x) * gelu(gate.0(x))) and its own pos_embedding (shared_pos=False), so
    gate.0 is transformers' gelu branch wi_0 and fc1 its linear branch wi_1.
    """
    top = {"token_embedding": "shared", "norm": "encoder.final_layer_norm"}
    block = {
        "norm1": "layer.0.layer_norm",
        "attn.q": "layer.0.SelfAttention.q",
        "attn.k": "layer.0.SelfAttention.k",
        "attn.v": "layer.0.SelfAttention.v",
        "attn.o": "layer.0.SelfAttention.o",
        "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
        "norm2": "layer.1.layer_norm",
        "ffn.gate.0": "layer.1.DenseReluDense.wi_0",
        "ffn.fc1": "layer.1.DenseReluDense.wi_1",
        "ffn.fc2": "layer.1.DenseReluDense.wo",
    }
    out = {}
    for name, t in sd.items():
        module, leaf = _param(name)
        m = re.match(r"^blocks\.(\d+)\.(.+)$", module)
        if module in top:
            name = f"{top[module]}.{leaf}"
        elif m is not None and m.group(2) in block:
            name = f"encoder.block.{m.group(1)}.{block[m.group(2)]}.{leaf}"
        out[name] = t  # an unknown name passes unchanged, for the strict loader to name
    return out
