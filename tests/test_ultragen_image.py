"""UltraGen image's procedure (models/ultragen_image.py) proven, not only run.

A recording model stands in for FLUX: it stores what every call receives and returns a
known velocity, a fixed function of each token's RoPE position. Because the velocity
does not change from step to step, Euler moves every detail token by exactly -t0 times
its position's velocity, whatever the schedule; the tests rebuild raster order from the
recorded positions alone (not from the layout code under test). So they fail when the
velocity is read back in the wrong token order, when a setting (NTK factor, guidance
mode, ratio, skip, shift) does not reach the model as the PNG metadata says, when the
warm start lands on another t than the recorded one, or when the guidance is not
re-noised every step in `renoise` mode.
"""

import json
import math

import pytest
import torch

import sample
from models import demo, sampling
from models import ultragen_image as ug
from models.flux import pack

TOKEN_DIM = 64


def field(ids: torch.Tensor) -> torch.Tensor:
    """A velocity that depends on the token's position only: (B, L, 3) -> (B, L, 64)."""
    g = torch.Generator().manual_seed(123)
    w, phase = torch.randn(3, TOKEN_DIM, generator=g), torch.randn(TOKEN_DIM, generator=g)
    return torch.sin(ids.float() @ w * 0.37 + phase)


class Recorder(torch.nn.Module):
    """Stands in for Flux: records each call and returns field(img_ids)."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config
        self.calls = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, plan=None,
                ntk_factor=None, n_guidance=0, guidance_timesteps=None):  # fmt: skip
        self.calls.append(
            dict(
                img=img.detach().clone(),
                ids=img_ids.detach().clone(),
                t=float(timesteps[0]),
                ntk=ntk_factor,
                n_guidance=n_guidance,
                g_t=None if guidance_timesteps is None else guidance_timesteps.clone(),
                plan=plan,
            )
        )
        return field(img_ids)


def raster(tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, L, C) at positions ids (B, L, 3) -> the same tokens sorted by (row,
    column): raster order, rebuilt from the positions alone."""
    key = ids[0, :, 1] * 100_000 + ids[0, :, 2]
    order = torch.argsort(key)
    return tokens[:, order], ids[:, order]


def settings(**kw) -> ug.Settings:
    base = dict(levels=[(64, 64), (256, 256)], steps=6, base_steps=3, skip=2, window=(8, 8),
                ratio=4, shift="off", hi_shift=3.0, backend="reference")  # fmt: skip
    return ug.Settings(**{**base, **kw})


def cond(n_text=3):
    return ug.Cond(torch.zeros(1, n_text, 8), torch.zeros(1, 8), torch.full((1,), 3.5))


def level(s: ug.Settings, prev: torch.Tensor, seed=0, ratio=None):
    model = Recorder()
    gen = torch.Generator().manual_seed(seed)
    out, info = ug.hierarchical_level(
        model, None, cond(), prev, s.levels[1], ratio or s.ratio, s, gen
    )
    return out, info, model.calls


def prev_latent(seed=5, value=None):
    if value is not None:
        return torch.full((1, 16, 8, 8), float(value))
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------


def test_velocity_is_read_back_in_raster_order():
    s = settings()
    out, info, calls = level(s, prev_latent())
    first = calls[0]
    n_g = first["n_guidance"]
    x0, ids = raster(first["img"][:, n_g:], first["ids"][:, n_g:])
    # every step moves a token by (t_next - t) v(pos): -t0 v(pos) in all
    expected = x0 - info["t0"] * field(ids)
    torch.testing.assert_close(pack(out), expected, rtol=0, atol=1e-5)  # fp32 sums


@pytest.mark.parametrize("mode", ["renoise", "clean"])
@pytest.mark.parametrize("ratio", [2, 4])
def test_settings_reach_the_model(mode, ratio):
    s = settings(ntk=7.5, guidance_mode=mode, hi_shift=2.5, steps=7, skip=3)
    prev = prev_latent()
    _, info, calls = level(s, prev, ratio=ratio)
    ts = sampling.schedule(7, 2.5)
    assert [c["t"] for c in calls] == pytest.approx(ts[3:-1], abs=1e-6)  # shift and skip
    assert ts != pytest.approx(sampling.schedule(7, 3.0))  # the shift matters
    assert info["t0"] == pytest.approx(ts[3], abs=1e-6) and info["steps"] == 4
    assert all(c["ntk"] == 7.5 for c in calls)
    # ratio: the guidance grid is the 16x16 token grid / ratio, at positions x ratio
    n = 16 // ratio
    assert all(c["n_guidance"] == n * n for c in calls)
    g_ids = calls[0]["ids"][0, : n * n]
    assert sorted(set(g_ids[:, 1].tolist())) == [float(ratio * i) for i in range(n)]
    # the guidance is the previous latent on that grid, packed (raster, from positions)
    g0 = pack(sampling.resize(prev, (2 * n, 2 * n), s.upsample))
    guid = [raster(c["img"][:, : n * n], c["ids"][:, : n * n])[0] for c in calls]
    if mode == "clean":
        assert all(c["g_t"] is not None and float(c["g_t"][0]) == 0.0 for c in calls)
        for g in guid:
            torch.testing.assert_close(g, g0, rtol=0, atol=1e-6)
    else:
        assert all(c["g_t"] is None for c in calls)
        # renoised every step along one straight path: g_k = (1 - t_k) g0 + t_k eps_g
        ta, ga, gb = calls[0]["t"], guid[0], guid[1]
        eps = (ga - (1 - ta) * g0) / ta
        for c, g in zip(calls, guid):
            torch.testing.assert_close(g, (1 - c["t"]) * g0 + c["t"] * eps, rtol=0, atol=1e-5)
        assert not torch.allclose(ga, gb)
        assert eps.std().item() == pytest.approx(1.0, abs=0.25)  # noise, not signal


def test_warm_start_lands_on_the_recorded_t0():
    """The same noise under two constant previous latents: the first detail input differs
    by exactly (1 - t0) (c1 - c2), so the warm start's t0 is read off the model's input."""
    s = settings(steps=8, skip=3)
    _, info, a = level(s, prev_latent(value=0.5), seed=9)
    _, _, b = level(s, prev_latent(value=-0.25), seed=9)
    n_g = a[0]["n_guidance"]
    diff = a[0]["img"][:, n_g:] - b[0]["img"][:, n_g:]
    t0 = 1 - diff.mean().item() / 0.75
    assert diff.std().item() < 1e-5
    assert t0 == pytest.approx(a[0]["t"], abs=1e-5) == pytest.approx(info["t0"], abs=1e-5)
    assert info["t0"] == pytest.approx(sampling.schedule(8, 3.0)[3], abs=1e-6)


def test_png_metadata_is_what_the_model_saw(tmp_path, monkeypatch):
    """A whole `sample.py flux --demo` run with the recorder inside: every recorded call
    agrees with the settings and the per-level facts written into the PNG."""
    seen = {}

    def models(device, dtype, weight_seed=0):
        m = real(device, dtype, weight_seed)
        seen["model"] = m.transformer = Recorder(m.transformer.config)
        return m

    real = demo.flux_models
    monkeypatch.setattr(demo, "flux_models", models)
    out = tmp_path / "r.png"
    argv = ["flux", "--demo", "--out", str(out), "--levels", "64,256", "--window", "8",
            "--steps", "6", "--base-steps", "4", "--skip", "2", "--ntk", "6.5", "--ratio", "2",
            "--guidance-mode", "clean", "--hi-shift", "2.5", "--seed", "4"]  # fmt: skip
    assert sample.main(argv) == 0
    meta = json.loads(sample.media.read_png(out.read_bytes())["text"]["parameters"])
    calls = seen["model"].calls
    lv1, lv2 = meta["levels"]
    base, hier = calls[: lv1["steps"]], calls[lv1["steps"] :]
    assert len(base) == meta["settings"]["base_steps"] == 4
    assert all(c["ntk"] == 1.0 and c["n_guidance"] == 0 for c in base)
    assert len(hier) == lv2["steps"] == 6 - 2
    assert all(c["ntk"] == meta["settings"]["ntk"] == 6.5 for c in hier)
    assert all(float(c["g_t"][0]) == 0.0 for c in hier)  # clean, as recorded
    assert meta["settings"]["guidance_mode"] == "clean"
    n = 16 // lv2["ratio"]
    assert lv2["ratio"] == 2 and all(c["n_guidance"] == n * n for c in hier)
    ts = sampling.schedule(6, meta["settings"]["hi_shift"])
    assert hier[0]["t"] == pytest.approx(lv2["t0"], abs=1e-6)
    assert [c["t"] for c in hier] == pytest.approx(ts[2:-1], abs=1e-6)
    assert math.isclose(meta["settings"]["hi_shift"], 2.5)
