"""UltraGen's joint sequence in the FLUX transformer (tiny preset, fp32, CPU):
[text | guidance | detail] in layout order through the hierarchical plan."""

import pytest
import torch

from attention import IMAGE_RULE, Layout, MaskRule, Plan
from models.flux import PRESETS, Flux, from_layout, layout_ids, to_layout

TOL = 1e-5  # fp32 max abs error
CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Flux(CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def tokens(n, seed, width=64):
    return torch.randn(2, n, width, generator=torch.Generator().manual_seed(seed))


def run(model, layout, img, plan=None, **kw):
    g = torch.Generator().manual_seed(9)
    txt = torch.randn(2, layout.n_text, CONFIG.context_in_dim, generator=g)
    y = torch.randn(2, CONFIG.vec_in_dim, generator=g)
    txt_ids, img_ids = layout_ids(layout, batch=2)
    t, guidance = torch.tensor([0.7, 0.4]), torch.tensor([3.5, 3.5])
    with torch.no_grad():
        return model(img, img_ids, txt, txt_ids, t, y, guidance, plan=plan, **kw)


def test_layout_round_trip():
    layout = Layout(grid=(6, 10), window=(4, 4), text=3, ratio=2)
    d, g = tokens(60, 1), tokens(layout.n_guidance, 2)
    img = to_layout(layout, d, g)
    assert not torch.equal(img, torch.cat([g, d], dim=1))  # window-first moved tokens
    d2, g2 = from_layout(layout, img)
    assert torch.equal(d2, d) and torch.equal(g2, g)
    with pytest.raises(ValueError, match="guidance"):
        to_layout(layout, d, g[:, 1:])


@pytest.mark.parametrize("backend", ["flex", "reference"])
def test_one_window_is_dense_flux(model, backend):
    """A single window covering the whole grid, no guidance, text seeing the image (as
    in FLUX; UltraGen's text sees guidance only): plain FLUX."""
    layout = Layout(grid=(4, 6), window=(4, 6), text=5)
    img = to_layout(layout, tokens(24, 3))
    dense = run(model, layout, img)
    plain = MaskRule(text_sees_detail=True)
    hier = run(model, layout, img, plan=Plan(layout, plain, backend=backend))
    assert (hier - dense).abs().max() <= TOL
    ultragen = run(model, layout, img, plan=Plan(layout, IMAGE_RULE, backend=backend))
    assert (ultragen - dense).abs().max() > 100 * TOL  # text no longer sees the image
    # and windows do change it: the comparison can fail
    small = Layout(grid=(4, 6), window=(2, 2), text=5, ratio=None)
    rule = MaskRule(neighbours="none", text_sees_detail=True)
    cut = run(model, small, to_layout(small, tokens(24, 3)), Plan(small, rule, backend=backend))
    assert (cut - dense).abs().max() > 100 * TOL


def text_states(model, fn):
    """Runs fn() -> (its output, the text rows of the last single block's output)."""
    seen = {}
    h = model.single_blocks[-1].register_forward_hook(lambda m, a, out: seen.update(x=out))
    try:
        out = fn()
    finally:
        h.remove()
    n_txt = seen["x"].shape[1] - out.shape[1]
    return out, seen["x"][:, :n_txt]


@pytest.mark.parametrize("mode", ["renoise", "clean"])
@pytest.mark.parametrize("backend", ["flex", "reference"])
def test_guidance_is_one_way(model, mode, backend):
    """Perturbing detail tokens leaves guidance and text outputs unchanged."""
    layout = Layout(grid=(8, 8), window=(4, 4), text=5, ratio=2)
    plan = Plan(layout, IMAGE_RULE, backend=backend)
    g = tokens(layout.n_guidance, 4)
    kw = dict(n_guidance=layout.n_guidance)
    if mode == "clean":
        kw["guidance_timesteps"] = torch.zeros(2)
    a, a_txt = text_states(
        model, lambda: run(model, layout, to_layout(layout, tokens(64, 5), g), plan, **kw)
    )
    b, b_txt = text_states(
        model, lambda: run(model, layout, to_layout(layout, tokens(64, 6), g), plan, **kw)
    )
    n_g = layout.n_guidance
    assert (a[:, :n_g] - b[:, :n_g]).abs().max() <= TOL
    assert (a_txt - b_txt).abs().max() <= TOL
    assert (a[:, n_g:] - b[:, n_g:]).abs().max() > 100 * TOL  # detail did change


def test_clean_mode_at_the_same_t_is_renoise(model):
    """The segment path (guidance with its own timestep) at the detail's timestep
    computes exactly what the single-segment path does."""
    layout = Layout(grid=(8, 8), window=(4, 4), text=5, ratio=2)
    plan = Plan(layout, IMAGE_RULE, backend="reference")
    img = to_layout(layout, tokens(64, 7), tokens(layout.n_guidance, 8))
    n = layout.n_guidance
    renoise = run(model, layout, img, plan, n_guidance=n)
    same = run(model, layout, img, plan, n_guidance=n, guidance_timesteps=torch.tensor([0.7, 0.4]))
    assert (same - renoise).abs().max() <= 1e-6
    clean = run(model, layout, img, plan, n_guidance=n, guidance_timesteps=torch.zeros(2))
    assert (clean[:, :n] - renoise[:, :n]).abs().max() > 100 * TOL


def test_guidance_positions_are_scaled():
    layout = Layout(grid=(8, 8), window=(4, 4), text=2, ratio=4, centre=True)
    txt_ids, img_ids = layout_ids(layout, batch=1)
    assert torch.equal(txt_ids, torch.zeros(1, 2, 3))
    g = img_ids[0, : layout.n_guidance]
    assert sorted(set(g[:, 1].tolist())) == [1.5, 5.5]  # rows 0, 1 of the coarse grid ×4 + 1.5
    d = img_ids[0, layout.n_guidance :]
    assert sorted(set(d[:, 2].tolist())) == [float(i) for i in range(8)]


def test_routed_lora_changes_only_guidance_qkv(model):
    """The guidance LoRA adds to the q/k/v of guidance tokens only: in every wrapped
    layer, output - base(input) is zero off the guidance rows and off the q/k/v
    columns, and nonzero on them."""
    import copy

    import torch.nn.functional as F

    from models.lora import add_guidance_lora, lora_modules

    m = copy.deepcopy(model)
    names = add_guidance_lora(m, rank=4, alpha=4)
    assert len(names) == CONFIG.depth + CONFIG.depth_single_blocks
    with torch.no_grad():
        for lora in lora_modules(m).values():
            lora.lora_B.weight.normal_(0, 0.5)
    layout = Layout(grid=(8, 8), window=(4, 4), text=5, ratio=2)
    n_g, n_t, d = layout.n_guidance, layout.n_text, CONFIG.hidden_size
    deltas = {}

    def hook(name):
        def fn(mod, args, out):
            deltas[name] = out - F.linear(args[0], mod.weight, mod.bias)

        return fn

    hooks = [mod.register_forward_hook(hook(n)) for n, mod in lora_modules(m).items()]
    img = to_layout(layout, tokens(64, 10), tokens(n_g, 11))
    run(m, layout, img, Plan(layout, IMAGE_RULE, backend="reference"), n_guidance=n_g)
    for h in hooks:
        h.remove()
    assert len(deltas) == len(names)
    for name, delta in deltas.items():
        rows = slice(0, n_g) if name.startswith("double") else slice(n_t, n_t + n_g)
        on = torch.zeros_like(delta, dtype=torch.bool)
        on[:, rows, : 3 * d] = True
        assert delta[~on].abs().max() == 0, name  # exactly untouched elsewhere
        assert (delta[on].abs() > 0).float().mean() > 0.99, name
    # base keys unchanged: the wrapped model still loads a plain FLUX state dict
    plain = {k: v for k, v in m.state_dict().items() if "lora_" not in k}
    assert plain.keys() == model.state_dict().keys()
