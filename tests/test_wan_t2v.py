"""Plain Wan2.1 text-to-video (models/wan_t2v.py): the procedure, against diffusers'
WanPipeline on the same tiny weights and noise, and against a recording model."""

import numpy as np
import pytest
import torch

from models import solvers, wan_t2v
from models.keymaps import wan_from_diffusers
from models.wan import PRESETS, Wan

CFG = PRESETS["tiny"]


def pair():
    """A tiny diffusers WanTransformer3DModel and ours with the same random weights."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    theirs = WanTransformer3DModel(
        patch_size=CFG.patch_size, num_attention_heads=CFG.num_heads,
        attention_head_dim=CFG.head_dim, in_channels=CFG.in_dim, out_channels=CFG.out_dim,
        text_dim=CFG.text_dim, freq_dim=CFG.freq_dim, ffn_dim=CFG.ffn_dim,
        num_layers=CFG.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6,
    ).eval()  # fmt: skip
    with torch.no_grad():  # non-trivial modulation tables and norms
        for name, p in theirs.named_parameters():
            if "scale_shift_table" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    with torch.device("meta"):
        ours = Wan(CFG)
    ours.load_state_dict(wan_from_diffusers(theirs.state_dict()), strict=True, assign=True)
    return ours.eval(), theirs


def contexts():
    """Prompt and negative prompt states as the text pipeline makes them: rows, then zeros."""
    g = torch.Generator().manual_seed(1)
    ctx = torch.zeros(2, CFG.text_len, CFG.text_dim)
    ctx[0, :5] = torch.randn(5, CFG.text_dim, generator=g)
    ctx[1, :9] = torch.randn(9, CFG.text_dim, generator=g)
    return ctx[:1], ctx[1:]


@pytest.mark.parametrize(("solver", "steps", "shift"), [("unipc", 6, 5.0), ("euler", 5, 3.0)])
def test_equals_diffusers_wan_pipeline(solver, steps, shift):
    """The whole loop (CFG 5, the official sigma grid, the solver) from the same noise.
    fp32; tolerance 1e-5 relative L2 (measured 6e-7: the two models differ in the
    order of fp32 operations only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

    ours, theirs = pair()
    ctx, ctx_null = contexts()
    size, frames = (64, 48), 9  # (H, W): latent (16, 3, 8, 6)
    noise = wan_t2v.noise(size, frames, seed=3)
    settings = wan_t2v.Settings(size=size, frames=frames, steps=steps, guidance=5.0,
                                shift=shift, solver=solver)  # fmt: skip
    with torch.no_grad():
        mine, _ = wan_t2v.sample(ours, ctx, ctx_null, noise, settings)

    if solver == "unipc":
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True,
            num_train_timesteps=1000, flow_shift=shift,
        )  # fmt: skip
        # the official grid starts at 0.999 read back from float32 (its scheduler stores it so)
        grid = np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1]
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        grid = np.linspace(1, 0, steps + 1)[:-1]
    set_timesteps = sched.set_timesteps
    sched.set_timesteps = lambda n=None, device=None, **kw: set_timesteps(
        sigmas=grid, device=device
    )  # the pipeline takes no sigmas: give it the official grid here
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=theirs, vae=None,
                       scheduler=sched)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt_embeds=ctx, negative_prompt_embeds=ctx_null, height=size[0], width=size[1],
        num_frames=frames, num_inference_steps=steps, guidance_scale=5.0,
        latents=noise.clone(), output_type="latent",
    ).frames  # fmt: skip
    rel = ((mine - out).norm() / out.norm()).item()
    print(f"{solver}: rel L2 {rel:.2e}")
    assert rel < 1e-5, rel


# ---------------------------------------------------------------------------------------
# a recording model
# ---------------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Records (t, which context) per call; returns a known velocity: a * x + b(context)."""

    def __init__(self, ctx, ctx_null):
        super().__init__()
        self.ctx, self.ctx_null, self.calls = ctx, ctx_null, []

    def forward(self, x, t, context):
        which = "prompt" if torch.equal(context, self.ctx) else "negative"
        assert which == "prompt" or torch.equal(context, self.ctx_null)
        self.calls.append((float(t[0]), which))
        return 0.3 * x + (1.0 if which == "prompt" else -2.0)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_what_the_model_sees(solver, guidance):
    """Each step asks the model at the solver's timestep with the prompt, then (guidance
    != 1) the negative prompt; the timesteps are the shifted official grid."""
    ctx, ctx_null = contexts()
    model = Recorder(ctx, ctx_null)
    s = wan_t2v.Settings(steps=7, guidance=guidance, shift=8.0, solver=solver)
    noise = wan_t2v.noise((32, 32), 5, seed=0)
    x, info = wan_t2v.sample(model, ctx, ctx_null, noise, s)
    ts = solvers.wan_timesteps(7, 8.0, solver).tolist()
    per_step = 1 if guidance == 1.0 else 2
    assert len(model.calls) == 7 * per_step
    assert [t for t, _ in model.calls[::per_step]] == pytest.approx(ts)
    if per_step == 2:
        assert [w for _, w in model.calls] == ["prompt", "negative"] * 7
        assert model.calls[0::2] == [(t, "prompt") for t, _ in model.calls[1::2]]
    # the shift reaches the grid: shift 8 differs from the default 5
    assert ts != pytest.approx(solvers.wan_timesteps(7, 5.0, solver).tolist())
    assert info["first_timestep"] == pytest.approx(ts[0])
    # CFG of the known velocities: v_neg + g (v - v_neg) = 0.3 x - 2 + 3 g; the solver run
    # on that velocity directly must give the same latent
    b = -2.0 + guidance * 3.0 if per_step == 2 else 1.0
    solver_obj = solvers.make_solver(solver, solvers.wan_sigmas(7, 8.0, solver))
    y = noise.clone()
    for _ in range(7):
        y = solver_obj.step(0.3 * y + b, y)
    torch.testing.assert_close(x, y, rtol=0, atol=1e-5)  # fp32, the same operations


def test_sizes_and_frames():
    assert wan_t2v.latent_shape((480, 832), 81) == (16, 21, 60, 104)
    assert wan_t2v.tokens((480, 832), 81) == 21 * 30 * 52
    for bad, words in [(80, "nearest: 77 or 81"), (2, "nearest: 1 or 5"), (0, r"1 \+ 4k")]:
        with pytest.raises(ValueError, match=words):
            wan_t2v.check_frames(bad)
    with pytest.raises(ValueError, match="multiples of 16"):
        wan_t2v.check_size((480, 840))
    assert wan_t2v.size_warning("wan-t2v-1.3b", (480, 832)) is None
    assert "720p" in wan_t2v.size_warning("wan-t2v-1.3b", (720, 1280))
    assert wan_t2v.size_warning("wan-t2v-14b", (720, 1280)) is None
    assert wan_t2v.default_size("wan-t2v-14b") == (720, 1280)
    assert wan_t2v.default_size("wan-t2v-1.3b") == (480, 832)
