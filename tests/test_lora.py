"""LoRA (models/lora.py), tiny FLUX preset, fp32 on CPU: the LoRALinear layer (zero
init, routing, autograd, merge), our files loaded by diffusers + PEFT, and community
LoRA formats (kohya, XLabs) against the same deltas written in diffusers' format and
against diffusers' own converters."""

import copy

import pytest
import torch
from torch import nn

from models.flux import PRESETS, Flux
from models.keymaps import flux_from_diffusers
from models.lora import (
    LoRALinear,
    add_guidance_lora,
    add_lora,
    apply_lora,
    load_lora,
    lora_modules,
    lora_parameters,
    read_lora,
    remove_lora,
    save_lora,
    set_route,
)
from tests.test_flux import inputs, random_diffusers, run_diffusers

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

CONFIG = PRESETS["tiny"]  # hidden 32 (h), linear1 rows 3h + 4h = 224, linear2 input 160
H = CONFIG.hidden_size
TOL = 1e-5  # fp32 max abs error of model outputs computed the same way (outputs ~10)
MERGED_TOL = 5e-5  # fp32: a merged delta vs the same LoRA run unmerged (other rounding)
DELTA_TOL = 1e-6  # fp32 max abs error of weight deltas


def randn(*shape, seed=0, std=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def randomize_lora(model, seed=0):
    with torch.no_grad():
        for i, p in enumerate(lora_parameters(model)):
            p.copy_(randn(*p.shape, seed=seed + i))


def unroute(model):
    """Routed LoRAs on every token, as diffusers applies a LoRA (the model's forward
    routes only LoRAs marked routed)."""
    for m in lora_modules(model).values():
        m.routed, m.route = False, None


@pytest.fixture(scope="module")
def base():
    """(diffusers model, our model with the same random weights, inputs)."""
    dm, sd = random_diffusers(CONFIG, seed=5)
    ours = Flux(CONFIG).eval()
    ours.load_state_dict(flux_from_diffusers(sd))
    return dm, ours, inputs(CONFIG)


def run(model, x):
    with torch.no_grad():
        return model(**x)


# ---------------------------------------------------------------------------------------
# 1. zero init, keys
# ---------------------------------------------------------------------------------------


def test_zero_init_is_exact_and_base_keys_unchanged(base):
    _, ours, x = base
    model = copy.deepcopy(ours)
    before = model.state_dict()
    names = add_guidance_lora(model, rank=4, alpha=4)
    assert names == [f"double_blocks.{i}.img_attn.qkv" for i in range(2)] + [
        f"single_blocks.{i}.linear1" for i in range(2)
    ]
    after = model.state_dict()
    new = {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert set(after) == set(before) | new and not set(before) & new
    assert all(torch.equal(after[k], before[k]) for k in before)
    unroute(model)  # every token goes through A and B: the delta is exactly zero
    assert torch.equal(run(model, x), run(ours, x))
    lin = nn.Linear(6, 9)  # the base tensors are shared, not copied
    assert LoRALinear.from_linear(lin, 2, 2).weight is lin.weight


def test_meta_device():
    with torch.device("meta"):
        model = Flux(CONFIG)
    qkv = model.double_blocks[0].img_attn.qkv.weight
    add_guidance_lora(model, rank=4, alpha=4)
    m = model.double_blocks[0].img_attn.qkv
    assert m.weight is qkv and m.lora_A.weight.is_meta and m.lora_B.weight.shape == (3 * H, 4)


# ---------------------------------------------------------------------------------------
# 2. routing and gradients
# ---------------------------------------------------------------------------------------


def linear1_lora(route, rows=(0, 3 * H), seed=1):
    """A LoRALinear shaped like linear1 (q|k|v|mlp), random nonzero A and B."""
    torch.manual_seed(seed)
    m = LoRALinear.from_linear(nn.Linear(H, 7 * H), rank=3, alpha=6, rows=rows, routed=True)
    with torch.no_grad():
        m.lora_B.weight.copy_(randn(*m.lora_B.weight.shape, seed=seed))
    m.route = route
    return m


@pytest.mark.parametrize("shape", [(2, 9, H), (9, H)])
def test_route_changes_only_routed_tokens_and_qkv_rows(shape):
    m = linear1_lora(route=(3, 7))
    x = randn(*shape, seed=2, std=1.0)
    seen = []
    m.lora_A.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-2]))
    with torch.no_grad():
        out, ref = m(x), nn.functional.linear(x, m.weight, m.bias)
    assert seen == [4]  # A and B run on the 4 routed tokens only
    assert torch.equal(out[..., :3, :], ref[..., :3, :])  # unrouted tokens: exactly the base
    assert torch.equal(out[..., 7:, :], ref[..., 7:, :])
    assert torch.equal(out[..., 3:7, 3 * H :], ref[..., 3:7, 3 * H :])  # mlp columns never
    assert (out[..., 3:7, : 3 * H] != ref[..., 3:7, : 3 * H]).all()  # q|k|v of routed: all
    m.route = None  # every token
    with torch.no_grad():
        out = m(x)
    assert (out[..., : 3 * H] != ref[..., : 3 * H]).all()
    assert torch.equal(out[..., 3 * H :], ref[..., 3 * H :])
    m.route = (0, 0)
    assert torch.equal(m(x), nn.functional.linear(x, m.weight, m.bias))
    m.route = (3, 10)
    with pytest.raises(ValueError, match="route"):
        m(x)


def test_set_route():
    model = Flux(CONFIG)
    add_guidance_lora(model, rank=2, alpha=2)
    set_route(model, (0, 5), (7, 12))
    routes = {n: m.route for n, m in lora_modules(model).items()}
    assert routes == {
        "double_blocks.0.img_attn.qkv": (0, 5),
        "double_blocks.1.img_attn.qkv": (0, 5),
        "single_blocks.0.linear1": (7, 12),
        "single_blocks.1.linear1": (7, 12),
    }


def test_autograd_path_matches_and_gradchecks():
    """With autograd recording, the delta is added out of place (cat of the untouched
    parts); without, in place. Both give the same output bit for bit, and gradcheck
    (fp64, numerical vs analytical) holds over x, W, b, A, B."""
    torch.manual_seed(3)
    m = LoRALinear(4, 10, rank=2, alpha=3, rows=(2, 7), routed=True).double()
    with torch.no_grad():
        m.lora_B.weight.normal_()
    m.route = (1, 3)
    x = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        in_place = m(x)
    assert torch.equal(m(x), in_place)
    names = ["weight", "bias", "lora_A.weight", "lora_B.weight"]
    params = [dict(m.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    def reference(x, W, b, A, B):
        delta = (x[:, 1:3] @ A.T @ B.T) * m.scale  # (2, 2 tokens, 5 rows)
        return x @ W.T + b + nn.functional.pad(delta, (2, 3, 1, 1))  # (2, 4, 10)

    assert (f(x, *params) - reference(x, *params)).abs().max() <= 1e-12
    assert torch.autograd.gradcheck(f, (x, *params))


def test_gradients_reach_only_lora(base):
    _, ours, x = base
    model = copy.deepcopy(ours).train()
    add_guidance_lora(model, rank=4, alpha=4)
    randomize_lora(model)  # B nonzero, so A gets a gradient too
    unroute(model)
    lora = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora)
    model(**x).square().mean().backward()
    for name, p in model.named_parameters():
        if id(p) in lora:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name


# ---------------------------------------------------------------------------------------
# 3. merge / unmerge
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [(0, 3 * H), None])
def test_merge_unmerge(rows):
    m = linear1_lora(route=None, rows=rows)
    m.routed = False
    x = randn(2, 9, H, seed=4, std=1.0)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        unmerged = m(x)
        m.merge()
        m.merge()  # a no-op: merged state is tracked
        merged = m(x)
        assert (merged - unmerged).abs().max() <= 1e-5  # measured 1e-6 (fp32, outputs ~3)
        assert (merged - nn.functional.linear(x, w0, m.bias)).abs().max() > 0.1
        m.unmerge()
        assert (m.weight - w0).abs().max() <= 1e-6  # measured 3e-8 (fp32 rounding)
        assert (m(x) - unmerged).abs().max() <= 1e-5
    m.routed = True
    with pytest.raises(RuntimeError, match="routed"):
        m.merge()


# ---------------------------------------------------------------------------------------
# 4. our files: loaded by diffusers + PEFT, and by load_lora
# ---------------------------------------------------------------------------------------


def lora_model(ours, seed=0):
    """Guidance LoRA (rank 4, alpha 8) plus LoRAs of other ranks and alphas (PEFT's
    rank / alpha patterns), one on the final modulation (diffusers' swapped halves)."""
    model = copy.deepcopy(ours)
    add_guidance_lora(model, rank=4, alpha=8)
    add_lora(model, "final_layer.adaLN_modulation.1", rank=3, alpha=1.5)
    add_lora(model, "single_blocks.0.linear2", rank=2, alpha=2)
    randomize_lora(model, seed)
    return model


def test_peft_round_trip_into_diffusers(base, tmp_path):
    dm, ours, x = base
    model = lora_model(ours)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path, metadata={"ultrares.note": "test"})
    unroute(model)
    out = run(model, x)
    assert (out - run(ours, x)).abs().max() > 100 * TOL  # the LoRA changes the output

    dm = copy.deepcopy(dm)  # diffusers' own loader, metadata read from the header
    dm.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True)
    err = (run_diffusers(dm, x) - out).abs().max().item()
    assert err <= TOL, err  # measured 0 (the same ops in the same order)

    # the pipeline's path: FluxPipeline.lora_state_dict + load_lora_into_transformer
    sd, alphas, meta = diffusers.FluxPipeline.lora_state_dict(
        str(path), return_alphas=True, return_lora_metadata=True
    )
    dm2 = copy.deepcopy(base[0])
    diffusers.FluxPipeline.load_lora_into_transformer(sd, alphas, dm2, metadata=meta)
    assert (run_diffusers(dm2, x) - out).abs().max() <= TOL


def test_load_lora_exact(base, tmp_path):
    _, ours, x = base
    model = lora_model(ours, seed=7)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path)
    fresh = copy.deepcopy(ours)  # no LoRA yet: load_lora wraps as the file says
    assert load_lora(fresh, path) == list(lora_modules(model))
    sd, sd2 = model.state_dict(), fresh.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for name, m in lora_modules(model).items():
        m2 = fresh.get_submodule(name)
        assert (m2.rank, m2.alpha, m2.rows, m2.routed) == (m.rank, m.alpha, m.rows, m.routed)
    wrapped = lora_model(ours, seed=8)  # existing LoRAs are overwritten in place
    load_lora(wrapped, path)
    unroute(model), unroute(wrapped)
    assert torch.equal(run(wrapped, x), run(model, x))
    # and our file read as a community LoRA gives the same model, merged
    merged = copy.deepcopy(ours)
    apply_lora(merged, read_lora(path))
    assert (run(merged, x) - run(model, x)).abs().max() <= MERGED_TOL  # measured 5e-6


# ---------------------------------------------------------------------------------------
# 5. community formats
# ---------------------------------------------------------------------------------------


def kohya_file():
    """kohya LoRA over BFL names, and the same deltas written in diffusers' format
    (by hand here: q|k|v|mlp of linear1 as four projections sharing A, B cut by rows,
    the final modulation's rows swapped, alpha per projection)."""
    r = 4
    specs = {  # kohya stem: (out, in, alpha or None)
        "double_blocks_0_img_attn_qkv": (3 * H, H, 2.0),
        "double_blocks_1_txt_attn_proj": (H, H, None),
        "double_blocks_0_img_mlp_0": (4 * H, H, 8.0),
        "single_blocks_0_linear1": (7 * H, H, 1.0),
        "single_blocks_1_linear2": (H, 5 * H, 4.0),
        "final_layer_adaLN_modulation_1": (2 * H, H, 3.0),
        "img_in": (H, 64, 4.0),
        "time_in_in_layer": (H, 256, 4.0),
    }
    kohya, diff = {}, {}
    for i, (stem, (out, inp, alpha)) in enumerate(specs.items()):
        down, up = randn(r, inp, seed=10 + i), randn(out, r, seed=30 + i)
        kohya[f"lora_unet_{stem}.lora_down.weight"] = down
        kohya[f"lora_unet_{stem}.lora_up.weight"] = up
        if alpha is not None:
            kohya[f"lora_unet_{stem}.alpha"] = torch.tensor(alpha)
        for module, b in diffusers_parts(stem, up):
            diff[f"transformer.{module}.lora_A.weight"] = down
            diff[f"transformer.{module}.lora_B.weight"] = b
            diff[f"transformer.{module}.alpha"] = torch.tensor(alpha if alpha else float(r))
    kohya["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = randn(4, 8)
    kohya["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = randn(8, 4)
    return kohya, diff


def diffusers_parts(stem, up):
    q, k, v = "attn.to_q", "attn.to_k", "attn.to_v"
    table = {
        "double_blocks_0_img_attn_qkv": [f"transformer_blocks.0.{p}" for p in (q, k, v)],
        "double_blocks_1_txt_attn_proj": ["transformer_blocks.1.attn.to_add_out"],
        "double_blocks_0_img_mlp_0": ["transformer_blocks.0.ff.net.0.proj"],
        "single_blocks_0_linear1": [
            f"single_transformer_blocks.0.{p}" for p in (q, k, v, "proj_mlp")
        ],
        "single_blocks_1_linear2": ["single_transformer_blocks.1.proj_out"],
        "final_layer_adaLN_modulation_1": ["norm_out.linear"],
        "img_in": ["x_embedder"],
        "time_in_in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    }
    if stem == "final_layer_adaLN_modulation_1":
        shift, scale = up.chunk(2)
        return [("norm_out.linear", torch.cat([scale, shift]))]
    modules = table[stem]
    sizes = [H] * (len(modules) - 1) + [up.shape[0] - H * (len(modules) - 1)]
    return list(zip(modules, up.split(sizes)))


def xlabs_file():
    """An XLabs LoRA (x-flux names) and the same deltas in diffusers' format (by hand)."""
    r, xl, diff = 4, {}, {}
    blocks = {  # x-flux processor LoRA: (out, in, diffusers modules)
        "double_blocks.0.processor.qkv_lora1": (3 * H, H, ["attn.to_q", "attn.to_k", "attn.to_v"]),
        "double_blocks.0.processor.proj_lora1": (H, H, ["attn.to_out.0"]),
        "double_blocks.1.processor.qkv_lora2": (
            3 * H,
            H,
            ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
        ),
        "double_blocks.1.processor.proj_lora2": (H, H, ["attn.to_add_out"]),
        "single_blocks.1.processor.qkv_lora": (3 * H, H, ["attn.to_q", "attn.to_k", "attn.to_v"]),
        "single_blocks.1.processor.proj_lora": (H, 5 * H, ["proj_out"]),
    }
    for i, (stem, (out, inp, modules)) in enumerate(blocks.items()):
        down, up = randn(r, inp, seed=50 + i), randn(out, r, seed=70 + i)
        xl[f"{stem}.down.weight"], xl[f"{stem}.up.weight"] = down, up
        kind, n = stem.split(".")[:2]
        prefix = "transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks"
        for module, b in zip(modules, up.chunk(len(modules))):
            diff[f"transformer.{prefix}.{n}.{module}.lora_A.weight"] = down
            diff[f"transformer.{prefix}.{n}.{module}.lora_B.weight"] = b
    return xl, diff


def applied(ours, lora, scale=1.0):
    model = copy.deepcopy(ours)
    apply_lora(model, lora, scale)
    return model


def max_delta_error(ours, a, b):
    """Max |(W_a - W) - (W_b - W)| over every weight, and how large the deltas are."""
    w, wa, wb = ours.state_dict(), a.state_dict(), b.state_dict()
    err = max((wa[k] - wb[k]).abs().max().item() for k in w)
    size = max((wa[k] - w[k]).abs().max().item() for k in w)
    return err, size


@pytest.mark.parametrize("fmt", ["kohya", "xlabs"])
def test_format_matches_diffusers_format(base, fmt):
    _, ours, x = base
    community, diff = kohya_file() if fmt == "kohya" else xlabs_file()
    if fmt == "kohya":  # its text-encoder keys are named, not applied
        with pytest.warns(UserWarning, match="text-encoder.*lora_te1_text_model"):
            lora = read_lora(community)
    else:
        lora = read_lora(community)
    a, b = applied(ours, lora), applied(ours, read_lora(diff))
    err, size = max_delta_error(ours, a, b)
    assert size > 0.1 and err <= DELTA_TOL, (err, size)
    assert (run(a, x) - run(b, x)).abs().max() <= TOL
    assert (run(a, x) - run(ours, x)).abs().max() > 100 * TOL
    remove_lora(a, lora)  # and taken out again: the base weights, to fp32 rounding
    assert (
        max((a.state_dict()[k] - v).abs().max().item() for k, v in ours.state_dict().items())
        <= DELTA_TOL
    )


def test_xlabs_scale_is_lora_weight_squared(base):
    """x-flux (XFluxPipeline.update_model_with_lora) multiplies every tensor of the file,
    down and up, by lora_weight w; its processors add up(down(x)) with no alpha. So
    ΔW = (w·up) @ (w·down) = w² · up @ down: apply_lora(scale=w**2)."""
    _, ours, _ = base
    xl, _ = xlabs_file()
    w = 0.7
    model = applied(ours, read_lora(xl), scale=w**2)
    down = xl["single_blocks.1.processor.qkv_lora.down.weight"] * w
    up = xl["single_blocks.1.processor.qkv_lora.up.weight"] * w
    got = model.single_blocks[1].linear1.weight - ours.single_blocks[1].linear1.weight
    assert (got[: 3 * H] - up @ down).abs().max() <= DELTA_TOL
    assert torch.equal(got[3 * H :], torch.zeros_like(got[3 * H :]))  # mlp rows untouched


@pytest.mark.parametrize("fmt", ["kohya", "xlabs"])
def test_format_matches_diffusers_converter(base, fmt):
    """diffusers' own converter (FluxPipeline.lora_state_dict) and loader as the oracle:
    its model with the converted LoRA == ours with the file applied. diffusers 0.42.1's
    kohya converter hard-codes linear1's full-size split (so linear1 is left out here)
    names img_in, time_in and the final layer without the `transformer.` prefix (its
    loader would drop them; the prefix is added here to check their mapping), and
    ignores the final layer's alpha (`# TODO: alphas` there; its alpha is left out here)."""
    dm, ours, x = base
    if fmt == "kohya":
        community = {k: v for k, v in kohya_file()[0].items() if "linear1" not in k}
        community = {k: v for k, v in community.items() if not k.startswith("lora_te")}
        del community["lora_unet_final_layer_adaLN_modulation_1.alpha"]
    else:
        community = xlabs_file()[0]
    converted = diffusers.FluxPipeline.lora_state_dict(dict(community))
    converted = {
        k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()
    }
    dm = copy.deepcopy(dm)
    dm.load_lora_adapter(converted, prefix="transformer")
    ref = run_diffusers(dm, x)
    out = run(applied(ours, read_lora(community)), x)
    assert (ref - run(ours, x)).abs().max() > 100 * TOL
    assert (out - ref).abs().max() <= MERGED_TOL  # measured kohya 1e-5, xlabs 4e-6


# ---------------------------------------------------------------------------------------
# 6. errors name the key
# ---------------------------------------------------------------------------------------


def test_errors_name_the_key(base):
    _, ours, _ = base
    model = copy.deepcopy(ours)
    A, B = randn(2, H), randn(H, 2)
    missing = {  # block 5 of a 2-block model
        "transformer.transformer_blocks.5.attn.to_q.lora_A.weight": A,
        "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": B,
    }
    with pytest.raises(ValueError, match=r"transformer_blocks\.5\.attn\.to_q.*lacks"):
        apply_lora(model, read_lora(missing))
    unknown = {"transformer.foo.lora_A.weight": A, "transformer.foo.lora_B.weight": B}
    with pytest.raises(ValueError, match=r"transformer\.foo"):
        read_lora(unknown)
    kohya = {
        "lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight": A,
        "lora_unet_double_blocks_0_img_attn_qkvx.lora_up.weight": B,
    }
    with pytest.raises(ValueError, match="lora_unet_double_blocks_0_img_attn_qkvx"):
        read_lora(kohya)
    xlabs = {
        "double_blocks.0.processor.ip_lora.down.weight": A,
        "double_blocks.0.processor.ip_lora.up.weight": B,
    }
    with pytest.raises(ValueError, match="ip_lora"):
        read_lora(xlabs)
    with pytest.raises(ValueError, match="lora_B"):
        read_lora({"transformer.x_embedder.lora_A.weight": A})
    # a wrong shape: img_in reads 64 features, not 32; nothing is applied, not even the
    # entry that fits
    wrong = {
        "lora_unet_img_in.lora_down.weight": randn(2, H),
        "lora_unet_img_in.lora_up.weight": B,
        "lora_unet_txt_in.lora_down.weight": randn(2, 64),
        "lora_unet_txt_in.lora_up.weight": B,
    }
    with pytest.raises(ValueError, match="lora_unet_img_in"):
        apply_lora(model, read_lora(wrong))
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in model.state_dict().items())
    # a LoRA whose rows cut through a diffusers projection cannot be saved
    add_lora(model, "double_blocks.0.img_attn.qkv", 2, 2, rows=(0, H + 3))
    with pytest.raises(ValueError, match="double_blocks.0.img_attn.qkv"):
        save_lora(model, "/nonexistent/never-written.safetensors")
