"""Checkpoint loading: files -> state dict -> strict, meta-built model.

    read_checkpoint(path)  a .safetensors file, a sharded folder (index.json), a list of
                           files, or a .pth/.pt/.bin pickle (weights_only loading only)
    detect_family(sd)      what the keys are: "flux", "flux-ae", "clip", "t5", "wan", ...
    build(ctor, sd, ...)   model built on the meta device, every key and shape checked,
                           then load_state_dict(assign=True): the tensors read from the
                           file become the parameters, no second copy

Format differences (prefixes, diffusers names, fp8 storage) are undone before `build`;
renames themselves live in models/keymaps.py. Every mismatch is a CheckpointError that
names the keys and shapes; nothing is skipped silently.
"""

import json
import pickle
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

SAFETENSORS = (".safetensors", ".sft")
PICKLES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is offered to."""


# ---------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------


def _check_safetensors(path: Path) -> dict:
    """Reads and checks the header ourselves, so a truncated or foreign file is a clear
    error here rather than a failure inside the reader. Returns the header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file: the header claims {n} bytes, "
                f"the file holds {size} bytes in all"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: its tensors need {8 + n + end} bytes, the file holds {size} "
            "(an interrupted download? compare the size with the source)"
        )
    return header


def read_safetensors(path, device="cpu", keys: Iterable[str] | None = None) -> dict:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            names = f.keys() if keys is None else keys
            return {k: f.get_tensor(k) for k in names}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def read_pickle(path) -> dict:
    """torch.load with weights_only=True: a pickle carrying code is refused, never run."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: this pickle holds objects other than tensors (it could run "
            f"code when loaded). Convert it to safetensors in a trusted place. ({e})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated zip, not a torch file
        raise CheckpointError(f"{path}: unreadable torch file ({e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def checkpoint_files(source) -> list[Path]:
    """The weight files of a file, a list of files, or a folder (sharded via
    *.index.json, else every safetensors file in it, else one pickle)."""
    if isinstance(source, (list, tuple)):
        return [p for s in source for p in checkpoint_files(s)]
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _index_shards(path)
        if path.suffix not in SAFETENSORS + PICKLES:
            raise CheckpointError(f"{path}: not a weight file (want {SAFETENSORS + PICKLES})")
        return [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if len(index) > 1:
        raise CheckpointError(f"{path}: several index files: {[p.name for p in index]}")
    if index:
        return _index_shards(index[0])
    files = sorted(p for p in path.iterdir() if p.suffix in SAFETENSORS)
    if not files:
        files = sorted(p for p in path.iterdir() if p.suffix in PICKLES)
    if not files:
        raise CheckpointError(f"{path}: no .safetensors (or .pth/.bin) files in this folder")
    return files


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a shard index ({e!r})") from None
    shards = [index.parent / s for s in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise CheckpointError(f"{index}: shards listed but absent: {missing}")
    return shards


def read_checkpoint(source, device="cpu") -> dict:
    """All tensors of a file, files or folder, as one flat state dict."""
    sd = {}
    for path in checkpoint_files(source):
        part = read_safetensors(path, device) if path.suffix in SAFETENSORS else read_pickle(path)
        twice = sd.keys() & part.keys()
        if twice:
            raise CheckpointError(f"{path}: keys also found in another file: {_few(twice)}")
        sd.update(part)
    return sd


# ---------------------------------------------------------------------------------------
# normalising: prefixes, fp8
# ---------------------------------------------------------------------------------------

# Prefixes of single-file bundles (ComfyUI, original SD-style checkpoints) -> component
BUNDLE_PREFIXES = {
    "model.diffusion_model.": "transformer",
    "diffusion_model.": "transformer",
    "first_stage_model.": "ae",
    "vae.": "ae",
    "text_encoders.clip_l.transformer.": "clip",
    "text_encoders.t5xxl.transformer.": "t5",
}


def split_bundle(sd: dict) -> dict[str, dict]:
    """Splits a file holding several models by key prefix: {component: state dict}.
    Keys with no known prefix go to component None."""
    out: dict = {}
    for k, t in sd.items():
        for prefix, part in BUNDLE_PREFIXES.items():
            if k.startswith(prefix):
                out.setdefault(part, {})[k[len(prefix) :]] = t
                break
        else:
            out.setdefault(None, {})[k] = t
    return out


COMFY_TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI repacks


def strip_prefix(sd: dict, prefixes: Iterable[str]) -> dict:
    """Removes the first prefix that every key carries, if any."""
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p) :]: t for k, t in sd.items()}
    return sd


def dequantize_fp8(sd: dict) -> dict:
    """Plain fp8 weights stay fp8 until `build` casts them. "Scaled" fp8 files (ComfyUI's
    *_fp8_scaled) carry a per-tensor `scale_weight` beside each weight: applied here in
    fp32, and their `scale_input` / `scaled_fp8` markers dropped."""
    out = {}
    for k, t in sd.items():
        if k == "scaled_fp8" or k.endswith(".scale_input"):
            continue
        if k.endswith(".scale_weight"):
            continue
        scale = sd.get(k[: -len("weight")] + "scale_weight") if k.endswith(".weight") else None
        out[k] = t if scale is None else t.float() * scale.float()
    return out


# ---------------------------------------------------------------------------------------
# what a state dict is
# ---------------------------------------------------------------------------------------

# (family, a key only that family has); the first match wins
_SIGNATURES = [
    ("flux", "double_blocks.0.img_attn.qkv.weight"),
    ("flux-diffusers", "transformer_blocks.0.attn.add_q_proj.weight"),
    ("wan-vae", "decoder.head.0.gamma"),  # before flux-ae-*: Wan's VAE shares some names
    ("wan-vae-diffusers", "decoder.norm_out.gamma"),
    ("flux-ae", "decoder.up.0.block.0.conv1.weight"),
    ("flux-ae-diffusers", "decoder.up_blocks.0.resnets.0.conv1.weight"),
    ("clip", "text_model.encoder.layers.0.self_attn.q_proj.weight"),
    ("clip", "encoder.layers.0.self_attn.q_proj.weight"),
    ("umt5", "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("t5", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("wan", "blocks.0.self_attn.q.weight"),
    ("wan-diffusers", "blocks.0.attn1.to_q.weight"),
    ("umt5-wan", "blocks.0.attn.q.weight"),
]


def detect_family(sd: dict) -> str:
    """Names the model a state dict holds, from keys only that model has."""
    for family, key in _SIGNATURES:
        if key in sd:
            return family
    raise CheckpointError(f"unrecognised checkpoint; its first keys are {_few(sorted(sd))}")


def expect_family(sd: dict, wanted: tuple[str, ...], source, what: str) -> str:
    family = detect_family(sd)
    if family not in wanted:
        raise CheckpointError(
            f"{source}: this holds a {family!r} model, but a {what} was expected "
            f"({' or '.join(wanted)})"
        )
    return family


# ---------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------


def _few(keys, n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict(expected: dict, sd: dict, what: str) -> None:
    """expected: {key: shape}. Raises naming every missing, unexpected and misshapen key."""
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    wrong = [
        f"{k}: file {tuple(sd[k].shape)}, model {tuple(expected[k])}"
        for k in sorted(expected.keys() & sd.keys())
        if tuple(sd[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"{what} does not fit its checkpoint: " + " | ".join(problems))


def build(
    ctor: Callable[[], nn.Module],
    sd: dict,
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    what: str = "model",
) -> nn.Module:
    """Builds ctor() on the meta device and loads sd into it (strict, assign=True).
    Floating-point tensors are cast to dtype (fp8 storage is upcast here)."""
    with torch.device("meta"):
        model = ctor()
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, sd, what)
    sd = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in sd.items()
    }
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer outside the state dict would be left unmaterialised
        raise RuntimeError(f"{what}: tensors still on the meta device: {_few(left)}")
    return model.eval().requires_grad_(False)


def count_blocks(sd: dict, prefix: str) -> int:
    """How many `prefix.N.` blocks a state dict holds (highest N + 1)."""
    found = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def first_match(folder: Path, *patterns: str) -> Path | None:
    """The first path (sorted) matching the first pattern that matches anything."""
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def default_dtype(device) -> torch.dtype:
    """bf16 on GPUs, fp32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
