"""LoRA for our FLUX transformer: trainable low-rank deltas, files in and out.

    LoRALinear             an nn.Linear (base keys unchanged) plus lora_A / lora_B; the
                           delta may cover some output rows only, and may be routed to
                           one range of tokens (UltraGen's guidance-only QKV LoRA)
    add_guidance_lora      wraps img_attn.qkv (double blocks) and the q|k|v rows of
                           linear1 (single blocks) in routed LoRALinears; set_route picks
                           the tokens before each forward
    save_lora / load_lora  our LoRAs as diffusers/PEFT files (FluxPipeline.load_lora_weights
                           loads them); load_lora reads them back exactly
    read_lora / apply_lora community FLUX LoRAs (diffusers/PEFT, kohya, XLabs) as deltas
                           on our BFL-named weights, merged into the base weights

A LoRA of rank r on a Linear W (out, in) adds ΔW = scale · B @ A with A (r, in),
B (out, r), scale = alpha / r. Our weights are BFL's, where diffusers splits some:
img_attn.qkv is diffusers' to_q | to_k | to_v stacked along the rows, linear1 is
to_q | to_k | to_v | proj_mlp, and the final layer's modulation rows are (shift, scale)
where diffusers has (scale, shift). Those names come from models/keymaps.py.
"""

import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.keymaps import (
    FLUX_BLOCK,
    FLUX_DOUBLE,
    FLUX_DOUBLE_FUSED,
    FLUX_SINGLE,
    FLUX_SINGLE_FUSED,
    FLUX_TOP,
)
from models.loading import read_checkpoint

# ---------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------


class LoRALinear(nn.Linear):
    """y = x W^T + b, plus scale · B(A(x)) on the output columns `rows` of the tokens
    in `route` (dim -2 of x). The base parameters keep the names `weight` and `bias`.

    rows:   (r0, r1), the output features the LoRA writes (None: all). lora_B has
            r1 - r0 rows.
    routed: the LoRA is meant for one segment of tokens only; it cannot be merged.
    route:  (t0, t1), the tokens the LoRA applies to, set before each forward
            (None: every token). Unrouted tokens never go through A and B.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        bias: bool = True,
        rows: tuple[int, int] | None = None,
        routed: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_lora(rank, alpha, rows, routed)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        rows: tuple[int, int] | None = None,
        routed: bool = False,
    ) -> "LoRALinear":
        """A LoRALinear sharing linear's weight and bias (the same Parameters, no copy).
        The LoRA weights are made on the base's device and dtype; on the meta device they
        stay meta until loaded, or until to_empty() and reset_lora_parameters()."""
        if isinstance(linear, LoRALinear):
            raise ValueError("this Linear already carries a LoRA")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self._add_lora(rank, alpha, rows, routed)
        return self

    def _add_lora(self, rank, alpha, rows, routed):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if rows is not None:
            rows = (int(rows[0]), int(rows[1]))
            if not 0 <= rows[0] < rows[1] <= self.out_features:
                raise ValueError(f"rows {rows} outside the {self.out_features} output features")
        self.rank, self.alpha, self.multiplier = rank, float(alpha), 1.0
        self.rows, self.routed, self.route, self.merged = rows, routed, None, False
        r0, r1 = self.row_range()
        kw = dict(bias=False, device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)  # (rank, in)
        self.lora_B = nn.Linear(rank, r1 - r0, **kw)  # (r1 - r0, rank)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """A as PEFT initialises it (kaiming uniform, a = sqrt 5), B zero: ΔW = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank * self.multiplier

    def row_range(self) -> tuple[int, int]:
        return self.rows if self.rows is not None else (0, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., L, out)
        if self.merged:
            return out
        L = x.shape[-2]
        t0, t1 = self.route if self.route is not None else (0, L)
        if not 0 <= t0 <= t1 <= L:
            raise ValueError(f"route {self.route} outside the {L} tokens of the input")
        if t0 == t1:
            return out
        r0, r1 = self.row_range()
        xr = x[..., t0:t1, :].to(self.lora_A.weight.dtype)  # (..., t1 - t0, in)
        delta = (self.lora_B(self.lora_A(xr)) * self.scale).to(out.dtype)  # (..., t1-t0, r1-r0)
        if torch.is_grad_enabled() and (out.requires_grad or delta.requires_grad):
            # autograd: out of place, [tokens before | routed tokens + delta | after]
            mid = out[..., t0:t1, :]
            mid = torch.cat([mid[..., :r0], mid[..., r0:r1] + delta, mid[..., r1:]], dim=-1)
            return torch.cat([out[..., :t0, :], mid, out[..., t1:, :]], dim=-2)
        out[..., t0:t1, r0:r1] += delta  # nothing recorded: in place, no second copy of out
        return out

    def delta_weight(self) -> torch.Tensor:
        """scale · B @ A in fp32: (r1 - r0, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    @torch.no_grad()
    def merge(self):
        """Folds the delta into `weight` (every token then gets it). A no-op when merged."""
        if self.routed:
            raise RuntimeError(
                "a routed LoRA applies to some tokens only; merging it into the weight "
                "would apply it to all of them"
            )
        if not self.merged:
            r0, r1 = self.row_range()
            self.weight[r0:r1] += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Takes the delta back out (exact up to rounding in the weight's dtype)."""
        if self.merged:
            r0, r1 = self.row_range()
            self.weight[r0:r1] -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        lora = f"rank={self.rank}, alpha={self.alpha}, rows={self.rows}"
        routed = f", routed, route={self.route}" if self.routed else ""
        return f"{super().extra_repr()}, {lora}{routed}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """lora_A and lora_B of every LoRALinear: what the trainer trains."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def add_lora(model, name: str, rank: int, alpha: float, rows=None, routed=False) -> LoRALinear:
    """Wraps the Linear `name` of model in a LoRALinear, in place."""
    m = LoRALinear.from_linear(model.get_submodule(name), rank, alpha, rows, routed)
    _replace(model, name, m)
    return m


def add_guidance_lora(model, rank: int = 16, alpha: float = 16) -> list[str]:
    """UltraGen's guidance LoRA: q, k, v of the image stream, routed to guidance tokens.
    Every double_blocks.N.img_attn.qkv (all rows) and the q|k|v rows of every
    single_blocks.N.linear1 (the MLP-input rows get none). Returns the wrapped names."""
    names = []
    for i, _ in enumerate(model.double_blocks):
        names.append(f"double_blocks.{i}.img_attn.qkv")
        add_lora(model, names[-1], rank, alpha, routed=True)
    for i, block in enumerate(model.single_blocks):
        names.append(f"single_blocks.{i}.linear1")
        hidden = block.linear1.in_features
        add_lora(model, names[-1], rank, alpha, rows=(0, 3 * hidden), routed=True)
    return names


def set_route(model, double: tuple[int, int] | None, single: tuple[int, int] | None):
    """Sets the tokens of every routed LoRA. Ranges are along each layer's own input:
    double-block img_attn.qkv sees the image tokens only, single-block linear1 sees
    [txt | img], so the same guidance tokens are (g0, g1) there and
    (L_txt + g0, L_txt + g1) here. None: every token."""
    for name, m in lora_modules(model).items():
        if m.routed and name.startswith("double_blocks."):
            m.route = double
        elif m.routed and name.startswith("single_blocks."):
            m.route = single


# ---------------------------------------------------------------------------------------
# names: BFL modules <-> diffusers projections (the tables live in models/keymaps.py)
# ---------------------------------------------------------------------------------------

_FINAL_MOD = "final_layer.adaLN_modulation.1"  # diffusers norm_out.linear, halves swapped
_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def _block_tables(prefix: str):
    if prefix == "double_blocks":
        return "transformer_blocks", FLUX_DOUBLE, FLUX_DOUBLE_FUSED
    return "single_transformer_blocks", FLUX_SINGLE, FLUX_SINGLE_FUSED


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: the final layer's modulation, either way."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _from_diffusers(module: str) -> tuple[str, int | None]:
    """diffusers module -> (BFL module, index of the part in a fused BFL weight or None).
    Unknown: KeyError."""
    if module == "norm_out.linear":
        return _FINAL_MOD, None
    if module in FLUX_TOP:
        return FLUX_TOP[module], None
    m = FLUX_BLOCK.match(module)
    if m is None:
        raise KeyError(module)
    kind, n, sub = m.groups()
    prefix = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
    _, renames, fused = _block_tables(prefix)
    if sub in renames:
        return f"{prefix}.{n}.{renames[sub]}", None
    for target, pieces in fused.items():
        if sub in pieces:
            return f"{prefix}.{n}.{target}", pieces.index(sub)
    raise KeyError(module)


def _to_diffusers(name: str, out_features: int, in_features: int) -> list[tuple[str, int, int]]:
    """BFL module -> its diffusers projections with their row spans, in row order. The
    parts of a fused weight have `in_features` (hidden) rows each, the last the rest."""
    top = {bfl: d for d, bfl in FLUX_TOP.items()} | {_FINAL_MOD: "norm_out.linear"}
    if name in top:
        return [(top[name], 0, out_features)]
    m = _BFL_BLOCK.match(name)
    if m is None:
        raise KeyError(name)
    prefix, n, sub = m.groups()
    kind, renames, fused = _block_tables(prefix)
    inverse = {bfl: d for d, bfl in renames.items()}
    if sub in inverse:
        return [(f"{kind}.{n}.{inverse[sub]}", 0, out_features)]
    if sub not in fused:
        raise KeyError(name)
    spans, start = [], 0
    for i, piece in enumerate(fused[sub]):
        stop = out_features if i == len(fused[sub]) - 1 else start + in_features
        spans.append((f"{kind}.{n}.{piece}", start, stop))
        start = stop
    return spans


# kohya names are BFL paths with dots as underscores, ambiguous (img_attn, adaLN_modulation):
# mapped back through tables of the BFL Linears
def _underscored(names) -> dict[str, str]:
    return {s.replace(".", "_"): s for s in names}


_KOHYA_TOP = _underscored([*FLUX_TOP.values(), _FINAL_MOD])
_KOHYA_BLOCK = {
    "double_blocks": _underscored([*FLUX_DOUBLE.values(), *FLUX_DOUBLE_FUSED]),
    "single_blocks": _underscored([*FLUX_SINGLE.values(), *FLUX_SINGLE_FUSED]),
}


def _from_kohya(stem: str) -> str:
    """'double_blocks_3_img_attn_qkv' -> 'double_blocks.3.img_attn.qkv'. Unknown: KeyError."""
    m = re.match(r"^(double_blocks|single_blocks)_(\d+)_(.+)$", stem)
    if m is None:
        return _KOHYA_TOP[stem]
    prefix, n, sub = m.groups()
    return f"{prefix}.{n}.{_KOHYA_BLOCK[prefix][sub]}"


# ---------------------------------------------------------------------------------------
# our LoRAs as diffusers/PEFT files
# ---------------------------------------------------------------------------------------

OURS_KEY = "ultrares_lora"  # header entry: {BFL module: {rank, alpha, rows, routed}}
PEFT_KEY = "lora_adapter_metadata"  # diffusers' header entry: LoraConfig kwargs, prefixed


def save_lora(model: nn.Module, path, metadata: dict | None = None):
    """Every LoRALinear of model as `transformer.<diffusers module>.lora_{A,B}.weight`.
    A fused BFL weight becomes its diffusers projections: the same A for each, B cut
    along the rows (img_attn.qkv -> to_q, to_k, to_v; linear1 rows (0, 3h) -> to_q,
    to_k, to_v). Ranks and alphas go in the header as diffusers writes them (PEFT
    LoraConfig kwargs under `transformer.`), and our own description for load_lora.
    `multiplier` is a strength knob at run time and is not saved."""
    tensors, ranks, alphas, ours = {}, {}, {}, {}
    for name, m in lora_modules(model).items():
        A, B = m.lora_A.weight.detach().cpu(), m.lora_B.weight.detach().cpu()
        r0 = m.row_range()[0]
        for module, s0, s1 in _lora_spans(name, m):
            key = f"transformer.{module}"
            b = B[s0 - r0 : s1 - r0]
            tensors[f"{key}.lora_A.weight"] = A.clone()  # safetensors stores no shared memory
            tensors[f"{key}.lora_B.weight"] = (_swap_halves(b) if name == _FINAL_MOD else b).clone()
            ranks[module], alphas[module] = m.rank, m.alpha
        ours[name] = dict(rank=m.rank, alpha=m.alpha, rows=m.rows, routed=m.routed)
    if not tensors:
        raise ValueError("the model has no LoRALinear to save")
    header = {PEFT_KEY: json.dumps(_peft_config(ranks, alphas)), OURS_KEY: json.dumps(ours)}
    for k, v in (metadata or {}).items():
        header[k] = v if isinstance(v, str) else json.dumps(v)
    save_file(tensors, str(path), metadata=header)


def _lora_spans(name: str, m: LoRALinear) -> list[tuple[str, int, int]]:
    """The diffusers projections inside m's rows; rows must fall on their boundaries."""
    r0, r1 = m.row_range()
    try:
        spans = _to_diffusers(name, m.out_features, m.in_features)
    except KeyError:
        raise ValueError(f"{name}: no diffusers name for this module") from None
    inside = [(d, s0, s1) for d, s0, s1 in spans if r0 <= s0 and s1 <= r1]
    if sum(s1 - s0 for _, s0, s1 in inside) != r1 - r0:
        raise ValueError(
            f"{name}: LoRA rows {m.rows} do not fall on the boundaries of diffusers' "
            f"projections {[(d, s0, s1) for d, s0, s1 in spans]}"
        )
    return inside


def _peft_config(ranks: dict, alphas: dict) -> dict:
    """LoraConfig kwargs as diffusers' save_lora_weights writes them for the transformer:
    the most common rank and alpha, patterns (anchored at the start) for the others."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = dict(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern={f"^{k}": v for k, v in ranks.items() if v != r},
        alpha_pattern={f"^{k}": v for k, v in alphas.items() if v != alpha},
    )
    return {f"transformer.{k}": v for k, v in config.items()}


_LORA_WORDS = ("lora_A", "lora_B", "lora_down", "lora_up", ".processor.", ".alpha")


def check_file(path, kind: str = "community") -> None:
    """Checks a LoRA file before any model is loaded; a one-line ValueError otherwise.

    It must exist and be a readable safetensors file (header checked; a zero-byte or
    truncated file is named as such) whose tensors are LoRA tensors. kind "guidance": a
    file written by save_lora (train.py's lora.safetensors). kind "community": read
    whole by read_lora (LoRA files are small), so an unknown module fails here too.
    Files other than safetensors (a .pt, .bin) are read whole through read_lora."""
    from models.loading import CheckpointError, _check_safetensors

    p = Path(path)
    if not p.exists():
        raise ValueError("file not found")
    if not p.is_file():
        raise ValueError("not a file")
    try:
        if p.suffix in (".safetensors", ".sft") or kind == "guidance":
            header = _check_safetensors(p)
            keys = [k for k in header if k != "__metadata__"]
            if not keys:
                raise ValueError("holds no tensors: not a LoRA")
            foreign = [k for k in keys if not any(w in k for w in _LORA_WORDS)]
            if foreign:
                raise ValueError(
                    f"not a LoRA: {len(foreign)} of its {len(keys)} tensors are not LoRA "
                    f"weights (e.g. {foreign[0]!r}); is it a model checkpoint?"
                )
            if kind == "guidance" and OURS_KEY not in (header.get("__metadata__") or {}):
                raise ValueError(
                    "not a guidance LoRA written by train.py (save_lora): pass community "
                    "LoRAs with --lora"
                )
        if kind != "guidance":
            read_lora(p)
    except CheckpointError as e:
        raise ValueError(str(e).replace(f"{p}: ", "")) from None


def _read_file(source) -> tuple[dict, dict]:
    """(state dict, safetensors header metadata) of a path or a state dict."""
    if isinstance(source, dict):
        return dict(source), {}
    sd = read_checkpoint(source)
    header = {}
    if Path(source).suffix in (".safetensors", ".sft"):
        with safe_open(str(source), framework="pt") as f:
            header = f.metadata() or {}
    return sd, header


@torch.no_grad()
def load_lora(model: nn.Module, path) -> list[str]:
    """Reads a file written by save_lora back into model, exactly. Linears that carry
    no LoRA yet are wrapped as the file describes; existing ones must match it.
    Returns the BFL module names loaded."""
    sd, header = _read_file(path)
    if OURS_KEY not in header:
        raise ValueError(
            f"{path}: not written by save_lora (no {OURS_KEY!r} in its header); "
            "read community LoRAs with read_lora / apply_lora"
        )
    used = set()
    for name, spec in json.loads(header[OURS_KEY]).items():
        rows = tuple(spec["rows"]) if spec["rows"] is not None else None
        m = _linear(model, name, name)
        if not isinstance(m, LoRALinear):
            m = add_lora(model, name, spec["rank"], spec["alpha"], rows, spec["routed"])
        elif (m.rank, m.alpha, m.rows) != (spec["rank"], spec["alpha"], rows):
            raise ValueError(
                f"{name}: the model's LoRA (rank {m.rank}, alpha {m.alpha}, rows {m.rows}) "
                f"differs from the file's (rank {spec['rank']}, alpha {spec['alpha']}, rows {rows})"
            )
        As, Bs = [], []
        for module, _, _ in _lora_spans(name, m):
            a, b = f"transformer.{module}.lora_A.weight", f"transformer.{module}.lora_B.weight"
            if a not in sd or b not in sd:
                raise ValueError(f"{path}: {name} needs {a} and {b}")
            As.append(sd[a])
            Bs.append(sd[b])
            used |= {a, b}
        if any(not torch.equal(a, As[0]) for a in As):
            raise ValueError(f"{name}: its projections have different lora_A; use apply_lora")
        B = torch.cat(Bs)
        _set(m.lora_A, As[0])
        _set(m.lora_B, _swap_halves(B) if name == _FINAL_MOD else B)
    if set(sd) - used:
        raise ValueError(f"{path}: tensors no LoRA of the file uses: {sorted(set(sd) - used)[:8]}")
    return list(json.loads(header[OURS_KEY]))


def _set(linear: nn.Linear, t: torch.Tensor):
    w = linear.weight
    if w.shape != t.shape:
        raise ValueError(
            f"LoRA weight of shape {tuple(t.shape)} where {tuple(w.shape)} is expected"
        )
    if w.is_meta:
        linear.weight = nn.Parameter(t.to(w.dtype), requires_grad=w.requires_grad)
    else:
        w.copy_(t)


# ---------------------------------------------------------------------------------------
# community LoRAs: read, apply (merge into the base weights), remove
# ---------------------------------------------------------------------------------------


class LoraDelta(NamedTuple):
    """ΔW = scale · B @ A, added to output rows `rows` (None: all) of one BFL Linear."""

    A: torch.Tensor  # (rank, in)
    B: torch.Tensor  # (r1 - r0, rank)
    scale: float
    rows: tuple[int, int] | None
    key: str  # where it came from in the file, for messages


def lora_format(sd: dict) -> str:
    """'kohya' (any .lora_down.weight), 'xlabs' (any key with `processor`), else
    'diffusers' (PEFT naming), as diffusers' FluxLoraLoaderMixin tells them apart."""
    if any(k.endswith(".lora_down.weight") for k in sd):
        return "kohya"
    if any(".processor." in k for k in sd):
        return "xlabs"
    return "diffusers"


def read_lora(source) -> dict[str, LoraDelta]:
    """A FLUX LoRA file or state dict -> {BFL module name: LoraDelta}.

    diffusers / PEFT: `transformer.<module>.lora_A/lora_B.weight` (optional `.alpha`, or
        rank / alpha in the header's lora_adapter_metadata; neither: scale 1). The q, k,
        v (and proj_mlp) parts of a fused BFL weight are fused: A = cat(A_q, A_k, A_v),
        B block-diagonal, zero rows for parts the file lacks; norm_out's rows swap halves.
    kohya: `lora_unet_<BFL path, dots as _>.lora_down/lora_up.weight` and `.alpha`;
        scale alpha / rank (no alpha: 1).
    XLabs (x-flux): `double_blocks.N.processor.{qkv,proj}_lora{1,2}` (1: image stream,
        2: text stream) on img_attn / txt_attn .qkv / .proj; `single_blocks.N.processor.
        qkv_lora` on the first 3·hidden rows of linear1 and `proj_lora` on linear2 (its
        input is [attention | mlp], as x-flux's SingleStreamBlockLoraProcessor applies it).
        x-flux stores no alpha and multiplies both down and up by its lora_weight w, so
        x-flux at w is apply_lora(scale=w**2); the file's own scale is 1.

    Text-encoder keys (lora_te*, text_encoder*) are not applied: a warning names them.
    A key no format above explains is a ValueError naming it."""
    sd, header = _read_file(source)
    for k in sd:
        if any(s in k for s in ("dora_scale", "lora_magnitude_vector", "lokr_", "hada_")):
            raise ValueError(f"{k}: DoRA / LoKr / LoHa LoRAs are not supported")
    fmt = lora_format(sd)
    if fmt == "kohya":
        deltas, text = _read_kohya(sd)
    elif fmt == "xlabs":
        deltas, text = _read_xlabs(sd), []
    else:
        deltas, text = _read_diffusers(sd, header)
    if text:
        warnings.warn(
            f"{len(text)} text-encoder LoRA tensors are not applied (ultrares applies "
            f"transformer LoRAs only), e.g. {sorted(text)[:3]}",
            stacklevel=2,
        )
    return deltas


def _groups(sd: dict, pattern: str) -> dict[str, dict[str, torch.Tensor]]:
    """{stem: {suffix: tensor}} for keys `<stem>.<suffix>` with suffix matching pattern."""
    out = {}
    for k, t in sd.items():
        m = re.match(rf"^(.+)\.({pattern})$", k)
        if m is None:
            raise ValueError(f"{k}: not a LoRA tensor this reader knows")
        out.setdefault(m[1], {})[m[2]] = t
    return out


def _pair(stem: str, parts: dict, down: str, up: str) -> tuple[torch.Tensor, torch.Tensor]:
    if down not in parts or up not in parts:
        raise ValueError(f"{stem}: needs both {down} and {up}, has {sorted(parts)}")
    A, B = parts[down], parts[up]
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"{stem}: {down} {tuple(A.shape)} and {up} {tuple(B.shape)} do not pair")
    return A, B


def _read_kohya(sd: dict) -> tuple[dict, list]:
    deltas, text = {}, []
    for stem, parts in _groups(sd, r"lora_down\.weight|lora_up\.weight|alpha").items():
        if stem.startswith("lora_te"):
            text += [f"{stem}.{s}" for s in parts]
            continue
        try:
            name = _from_kohya(stem.removeprefix("lora_unet_"))
        except KeyError:
            raise ValueError(f"{stem}: no FLUX module of that name") from None
        A, B = _pair(stem, parts, "lora_down.weight", "lora_up.weight")
        alpha = float(parts["alpha"]) if "alpha" in parts else A.shape[0]
        deltas[name] = LoraDelta(A, B, alpha / A.shape[0], None, stem)
    return deltas, text


_XLABS = {  # processor LoRA -> (BFL module in the block, rows: "qkv" = the first 3·hidden)
    ("double_blocks", "qkv_lora1"): ("img_attn.qkv", None),
    ("double_blocks", "proj_lora1"): ("img_attn.proj", None),
    ("double_blocks", "qkv_lora2"): ("txt_attn.qkv", None),
    ("double_blocks", "proj_lora2"): ("txt_attn.proj", None),
    ("single_blocks", "qkv_lora"): ("linear1", "qkv"),
    ("single_blocks", "proj_lora"): ("linear2", None),
}


def _read_xlabs(sd: dict) -> dict:
    deltas = {}
    for stem, parts in _groups(sd, r"down\.weight|up\.weight").items():
        m = re.match(
            r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)$", stem
        )
        if m is None or (m[1], m[3]) not in _XLABS:
            raise ValueError(f"{stem}: not an XLabs FLUX LoRA module")
        sub, rows = _XLABS[(m[1], m[3])]
        A, B = _pair(stem, parts, "down.weight", "up.weight")
        if rows == "qkv":
            if B.shape[0] != 3 * A.shape[1]:
                raise ValueError(f"{stem}: up {tuple(B.shape)} must have 3 x {A.shape[1]} rows")
            rows = (0, B.shape[0])
        deltas[f"{m[1]}.{m[2]}.{sub}"] = LoraDelta(A, B, 1.0, rows, stem)
    return deltas


def _read_diffusers(sd: dict, header: dict) -> tuple[dict, list]:
    config = json.loads(header.get(PEFT_KEY, "null")) or {}
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    text = [k for k in sd if k.startswith("text_encoder")]
    model_sd = {k.removeprefix("transformer."): t for k, t in sd.items() if k not in text}
    single, fused = {}, {}  # BFL name -> LoraDelta / {part index: LoraDelta}
    for module, parts in _groups(model_sd, r"lora_A\.weight|lora_B\.weight|alpha").items():
        A, B = _pair(module, parts, "lora_A.weight", "lora_B.weight")
        scale = _peft_scale(module, parts, A.shape[0], config)
        try:
            name, index = _from_diffusers(module)
        except KeyError:
            raise ValueError(f"transformer.{module}: no FLUX module of that name") from None
        if name == _FINAL_MOD:
            B = _swap_halves(B)
        delta = LoraDelta(A, B, scale, None, f"transformer.{module}")
        if index is None:
            single[name] = delta
        else:
            fused.setdefault(name, {})[index] = delta
    return single | {name: _fuse(name, parts) for name, parts in fused.items()}, text


def _peft_scale(module: str, parts: dict, rank: int, config: dict) -> float:
    """alpha / rank as PEFT computes it: a `.alpha` tensor, else the header's
    alpha_pattern / lora_alpha (PEFT's default 8), else alpha = rank."""
    if "alpha" in parts:
        return float(parts["alpha"]) / rank
    if not config:
        return 1.0
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's get_pattern_key
            alpha = value
            break
    return alpha / rank


def _fuse(name: str, parts: dict[int, LoraDelta]) -> LoraDelta:
    """The parts (q, k, v, proj_mlp) of one fused BFL weight as one delta:
    A = cat(A_i) (sum r_i, in), B block-diagonal over the rows the parts cover."""
    first = parts[min(parts)]
    hidden = first.A.shape[1]  # every part reads the hidden state; q, k, v write it too
    keys = [parts[i].key for i in sorted(parts)]
    for i, p in parts.items():
        if p.A.shape[1] != hidden:
            raise ValueError(f"{p.key}: lora_A {tuple(p.A.shape)} does not read {hidden} features")
        if i < 3 and p.B.shape[0] != hidden:
            raise ValueError(f"{p.key}: lora_B {tuple(p.B.shape)} does not write {hidden} rows")
    r0 = min(parts) * hidden
    r1 = max(i * hidden + p.B.shape[0] for i, p in parts.items())
    scales = {p.scale for p in parts.values()}
    scale = scales.pop() if len(scales) == 1 else 1.0  # else each part's scale goes into B
    rank = sum(p.A.shape[0] for p in parts.values())
    dtype = torch.promote_types(first.A.dtype, first.B.dtype)
    A = torch.cat([parts[i].A.to(dtype) for i in sorted(parts)])  # (rank, hidden)
    B = torch.zeros(r1 - r0, rank, dtype=dtype)
    col = 0
    for i in sorted(parts):
        p = parts[i]
        start, r = i * hidden - r0, p.A.shape[0]
        B[start : start + p.B.shape[0], col : col + r] = p.B * (p.scale / scale)
        col += r
    return LoraDelta(A, B, scale, (r0, r1), " + ".join(keys))


def _linear(model: nn.Module, name: str, key: str) -> nn.Linear:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{key}: targets {name}, which this model lacks") from None
    if not isinstance(m, nn.Linear):
        raise ValueError(f"{key}: targets {name}, a {type(m).__name__}, not a Linear")
    return m


def _resolve(model, lora: dict[str, LoraDelta]) -> list[tuple[nn.Linear, LoraDelta]]:
    """Every target found and every shape checked before anything changes."""
    out = []
    for name, d in lora.items():
        m = _linear(model, name, d.key)
        r0, r1 = d.rows if d.rows is not None else (0, m.out_features)
        if d.A.shape[1] != m.in_features or d.B.shape[0] != r1 - r0 or r1 > m.out_features:
            raise ValueError(
                f"{d.key}: A {tuple(d.A.shape)}, B {tuple(d.B.shape)} on rows {(r0, r1)} do "
                f"not fit {name} of shape {tuple(m.weight.shape)}"
            )
        out.append((m, d))
    return out


@torch.no_grad()
def _add(model, lora, scale: float) -> list[str]:
    if isinstance(lora, (str, os.PathLike)):
        lora = read_lora(lora)
    for m, d in _resolve(model, lora):
        r0, r1 = d.rows if d.rows is not None else (0, m.out_features)
        w = m.weight
        delta = (d.B.to(w.device, torch.float32) @ d.A.to(w.device, torch.float32)) * (
            scale * d.scale
        )
        w[r0:r1] += delta.to(w.dtype)
    return list(lora)


def apply_lora(model: nn.Module, lora, scale: float = 1.0) -> list[str]:
    """Merges a community LoRA (read_lora's result, or a path) into the base weights:
    W[rows] += scale · lora_scale · B @ A, for every token. The delta is formed in fp32
    and rounded once into the weight's dtype. Returns the module names changed."""
    return _add(model, lora, scale)


def remove_lora(model: nn.Module, lora, scale: float = 1.0) -> list[str]:
    """Subtracts what apply_lora(model, lora, scale) added. In fp32 that restores the
    weights to rounding (~1e-7 relative); in bf16 each add and subtract rounds, so
    reload the base weights where exactness matters."""
    return _add(model, lora, -scale)
