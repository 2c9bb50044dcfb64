"""sample.py and models/sampling.py on CPU: the pure sampling math, then whole runs of
the demo pipeline (tiny random models) in-process through sample.main."""

import json
import math
import struct

import pytest
import torch

import sample
from models import demo, media, sampling

# small runs: 256 px = 16x16 tokens = 4 windows of 8x8 at ratio 4 (guidance 4x4)
SMALL = ["--levels", "64,256", "--window", "8", "--steps", "6", "--skip", "2"]


def run(tmp_path, name, *argv):
    """main(["flux", "--demo", ...]) -> (the PNG's bytes, its parsed info)."""
    out = tmp_path / name
    assert sample.main(["flux", "--demo", "--out", str(out), *argv]) == 0
    data = out.read_bytes()
    return data, media.read_png(data)


def pixels(data: bytes) -> bytes:
    """The decompressed image rows of a PNG written by sample.png_bytes."""
    import zlib

    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    return zlib.decompress(idat)


# ---------------------------------------------------------------------------------------
# schedules and steps
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", ["off", "dynamic", 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_schedule_endpoints_and_monotone(shift, steps):
    ts = sampling.schedule(steps, shift, n_tokens=4096)
    assert len(ts) == steps + 1
    assert ts[0] == 1.0 and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_schedule_off_is_linspace():
    assert sampling.schedule(4, "off") == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_time_shift_matches_the_bfl_formula():
    # mu(n) = 0.5 + (n - 256) * 0.65 / 3840: mu(256) = 0.5, mu(4096) = 1.15
    assert sampling.linear_mu(256) == pytest.approx(0.5)
    assert sampling.linear_mu(4096) == pytest.approx(1.15)
    assert sampling.linear_mu(1024) == pytest.approx(0.63)
    # t' = e^mu / (e^mu + 1/t - 1): at mu = 1.15, t = 0.5 -> e^1.15 / (e^1.15 + 1)
    assert float(sampling.time_shift(0.5, 1.15)) == pytest.approx(0.759510916, abs=1e-9)
    # mu = 0.5, t = 0.25: e^0.5 / (e^0.5 + 3) = 1.6487213 / 4.6487213 (bc -l)
    assert float(sampling.time_shift(0.25, 0.5)) == pytest.approx(0.354661244, abs=1e-9)
    # a 1024 px image (4096 tokens), 4 steps, as BFL's get_schedule computes it
    e = math.exp(1.15)
    expected = [1.0, e / (e + 1 / 3), e / (e + 1), e / (e + 3), 0.0]
    assert sampling.schedule(4, "dynamic", n_tokens=4096) == pytest.approx(expected, abs=1e-12)
    # a static shift s is mu = ln s: s t / (1 + (s - 1) t)
    assert sampling.schedule(2, 3.0) == pytest.approx([1.0, 0.75, 0.0])
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    assert torch.allclose(sampling.static_shift(t, 3.0), sampling.time_shift(t, math.log(3.0)))


def test_parse_shift():
    assert sampling.parse_shift("off") == "off"
    assert sampling.parse_shift("3") == 3.0
    for bad in ("on", "-1", "0"):
        with pytest.raises(ValueError):
            sampling.parse_shift(bad)


def test_euler_recovers_a_linear_flow_exactly():
    """x_t = (1 - t) x0 + t eps has the constant velocity eps - x0: Euler is exact on
    any schedule, and lands on x0 at t = 0."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    ts = sampling.schedule(7, "dynamic", n_tokens=1000)
    x = sampling.noised(x0, eps, ts[0])
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = sampling.euler_step(x, eps - x0, t, t_next)
        assert torch.allclose(x, sampling.noised(x0, eps, t_next), atol=1e-6)
    assert torch.allclose(x, x0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# warm start
# ---------------------------------------------------------------------------------------


def test_warm_start_lands_on_the_schedule_at_skip():
    """Upsampled and sharpened, a constant latent stays constant, so the warm start is
    exactly x at t_k = (1 - t_k) c + t_k eps, the flow's point at step k."""
    steps, skip = 28, 10
    ts = sampling.schedule(steps, 3.0)
    t0 = ts[skip]
    assert t0 == pytest.approx(3 * (18 / 28) / (1 + 2 * (18 / 28)))
    low = torch.full((1, 16, 8, 8), 0.3)
    x0 = sampling.sharpened_upsample(low, (32, 32), amount=0.5, sigma=1.0)
    assert x0.shape == (1, 16, 32, 32) and torch.allclose(x0, torch.full_like(x0, 0.3))
    eps = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    x = sampling.warm_start(x0, eps, t0)
    assert torch.allclose(x, (1 - t0) * 0.3 + t0 * eps, atol=1e-6)
    # the remaining steps run from t_k to 0
    assert len(ts[skip:]) - 1 == steps - skip
    with pytest.raises(ValueError):
        sampling.check_skip(steps, steps)


def test_unsharp_mask_sharpens():
    """An edge gets over- and undershoot; amount 0 is the identity; means are kept."""
    z = torch.zeros(1, 1, 1, 16)
    z[..., 8:] = 1.0
    s = sampling.unsharp_mask(z, 1.0, (0.0, 1.0))
    assert s[..., 7] < 0 and s[..., 8] > 1
    assert torch.equal(sampling.unsharp_mask(z, 0.0, (1.0, 1.0)), z)
    r = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(2))
    up = sampling.sharpened_upsample(r, (48, 48))
    assert up.shape == (1, 2, 48, 48)
    assert torch.allclose(up.mean((2, 3)), r.mean((2, 3)), atol=0.05)


# ---------------------------------------------------------------------------------------
# layout and memory
# ---------------------------------------------------------------------------------------


def test_layout_of_a_target_size():
    lay = sampling.hierarchical_layout((4096, 4096), text=512, window=(16, 16), ratio=4)
    assert lay.grid == (1, 256, 256) and lay.window_grid == (1, 16, 16)
    assert lay.n_windows == 256 and lay.guidance_grid == (1, 64, 64)
    assert lay.n == 512 + 64 * 64 + 256 * 256  # a 1024 px level packed = the guidance
    demo = sampling.hierarchical_layout((512, 512), text=16, window=(16, 16), ratio=4)
    assert demo.n_windows == 4 and demo.guidance_grid == (1, 8, 8)
    wide = sampling.hierarchical_layout((2048, 4096), text=0, window=(16, 16), ratio=4)
    assert wide.window_grid == (1, 8, 16) and wide.guidance_grid == (1, 32, 64)
    assert sampling.level_ratio((8192, 8192), (4096, 4096)) == 2
    with pytest.raises(ValueError):
        sampling.level_ratio((4096, 2048), (1024, 1024))
    with pytest.raises(ValueError):
        sampling.token_grid((1000, 1024))


def test_memory_estimate_grows_and_stops():
    kw = dict(weights=24 << 30, hidden=3072, dtype_bytes=2)
    small = sampling.estimate_memory(n_tokens=4_608, image=(1024, 1024), **kw)
    large = sampling.estimate_memory(n_tokens=70_144, image=(4096, 4096), **kw)
    assert large.activations > 10 * small.activations and large.total > small.total
    assert sampling.memory_problem(large, 80 << 30) is None
    msg = sampling.memory_problem(large, 24 << 30, "level 4096x4096 ")
    assert msg and "24.0 GiB" in msg and "level 4096x4096" in msg


def test_early_stop_on_memory(tmp_path, capsys):
    out = tmp_path / "m.png"
    with pytest.raises(SystemExit) as e:
        sample.main(["flux", "--demo", *SMALL, "--memory-limit", "0.0001", "--out", str(out)])
    assert e.value.code != 0
    assert "will not fit" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# whole runs
# ---------------------------------------------------------------------------------------


def test_demo_writes_png_and_refuses_overwrite(tmp_path, capsys):
    """The default demo (levels 128,512: 4 windows at 512 px), with fewer steps."""
    data, info = run(tmp_path, "x.png", "--seed", "7", "--steps", "4", "--skip", "1")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (info["width"], info["height"]) == (512, 512)
    meta = json.loads(info["text"]["parameters"])
    assert meta["seed"] == 7 and meta["demo"] is True
    assert meta["prompt"] == sample.build_parser().parse_args(["flux"]).prompt
    assert "not a picture" in meta["warning"] and "not a picture" in info["text"]["Warning"]
    s = meta["settings"]
    assert s["levels"] == ["128x128", "512x512"] and s["steps"] == 4 and s["skip"] == 1
    assert (s["window"], s["ratio"], s["halo"], s["ntk"]) == ([16, 16], 4, 1, 10.0)
    assert (s["guidance_mode"], s["scope"], s["hi_shift"]) == ("renoise", "aligned", 3.0)
    lvl = meta["levels"][1]
    assert "windows 1x16x16 -> 1x2x2 = 4" in lvl["layout"] and lvl["steps"] == 3
    assert lvl["t0"] == pytest.approx(sampling.schedule(4, 3.0)[1])
    err = capsys.readouterr().err
    assert "not a picture" in err and "step 2/3" in err and "ETA" in err and "3 steps in" in err

    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as e:
        sample.main(["flux", "--demo", "--out", str(out), "--seed", "8"])
    assert e.value.code != 0
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == data


def test_recursive_levels(tmp_path):
    data, info = run(
        tmp_path, "r.png", "--levels", "32,64,256", "--window", "8",
        "--ratio", "auto", "--steps", "4", "--skip", "1", "--seed", "3",
    )  # fmt: skip
    assert (info["width"], info["height"]) == (256, 256)
    levels = json.loads(info["text"]["parameters"])["levels"]
    assert [lv["size"] for lv in levels] == [[32, 32], [64, 64], [256, 256]]
    assert [lv.get("ratio") for lv in levels] == [None, 2, 4]


def test_same_seed_same_image_other_seed_differs(tmp_path):
    a, _ = run(tmp_path, "a.png", *SMALL, "--seed", "11")
    b, _ = run(tmp_path, "b.png", *SMALL, "--seed", "11")
    c, _ = run(tmp_path, "c.png", *SMALL, "--seed", "12")
    assert pixels(a) == pixels(b)
    assert pixels(a) != pixels(c)


def test_options_run(tmp_path):
    """The non-default choices: clean guidance, aligned scope, shifted windows, pixel
    warm start, no shift, a wide image."""
    _, info = run(
        tmp_path, "o.png", "--levels", "64x32,256x128", "--window", "8", "--steps", "3",
        "--skip", "1", "--guidance-mode", "clean", "--scope", "aligned", "--margin", "0",
        "--neighbours", "shift", "--warm-space", "pixel", "--hi-shift", "off", "--centre",
        "--no-guidance-sees-text", "--seed", "5",
    )  # fmt: skip
    assert (info["width"], info["height"]) == (256, 128)
    lvl = json.loads(info["text"]["parameters"])["levels"][1]
    assert lvl["t0"] == pytest.approx(2 / 3)


def test_bad_arguments(tmp_path, capsys):
    out = str(tmp_path / "z.png")
    for argv, words in [
        (["--levels", "100,400"], "multiples of 16"),
        (["--steps", "4", "--skip", "4"], "skip"),
        (["--levels", "64,256", "--window", "6"], "divisible"),
        (["--levels", "64,160", "--ratio", "auto"], "whole multiple"),
        (["--model", "nowhere"], "--demo"),
    ]:
        with pytest.raises(SystemExit) as e:
            sample.main(["flux", "--demo", "--out", out, *argv])
        assert e.value.code != 0
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sample.main(["flux", "--out", out])  # no weights and no --demo
    assert e.value.code != 0 and "--demo" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["flux", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in [
        "--levels", "--window", "--ratio", "--halo", "--scope", "--margin", "--neighbours",
        "--guidance-mode", "--ntk", "--skip", "--steps", "--guidance-scale", "--shift",
        "--hi-shift", "--guidance-lora", "--lora", "--seed", "--dtype", "--device", "--out",
        "--model", "--transformer", "--ae", "--clip", "--t5", "--tokenizers", "--force",
        "--demo", "--sharpen", "--memory-limit",
    ]:  # fmt: skip
        assert opt in text


def test_loras(tmp_path):
    """The guidance LoRA acts on guidance tokens only: none at a single level, a change
    at two; a community LoRA (kohya file) changes every level."""
    lora = pytest.importorskip("models.lora")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    model = demo.flux_models("cpu", torch.float32).transformer
    lora.add_guidance_lora(model, rank=4, alpha=4)
    for m in lora.lora_modules(model).values():
        m.lora_B.weight.data.normal_(0, 0.5, generator=g)
    glora = tmp_path / "guidance.safetensors"
    lora.save_lora(model, glora)
    kohya = tmp_path / "style.safetensors"
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file(
        {
            f"{stem}.lora_down.weight": torch.randn(2, 32, generator=g),
            f"{stem}.lora_up.weight": torch.randn(96, 2, generator=g),
            f"{stem}.alpha": torch.tensor(2.0),
        },
        str(kohya),
    )
    one = ["--levels", "64", "--steps", "3", "--seed", "1"]
    plain = pixels(run(tmp_path, "a.png", *one)[0])
    assert pixels(run(tmp_path, "b.png", *one, "--guidance-lora", str(glora))[0]) == plain

    two = [*SMALL, "--seed", "1"]
    plain = pixels(run(tmp_path, "c.png", *two)[0])
    data, info = run(tmp_path, "d.png", *two, "--guidance-lora", str(glora))
    assert pixels(data) != plain
    assert json.loads(info["text"]["parameters"])["settings"]["guidance_lora"] == str(glora)
    data, info = run(tmp_path, "e.png", *two, "--lora", f"{kohya}:0.5")
    assert pixels(data) != plain
    assert json.loads(info["text"]["parameters"])["settings"]["lora"] == [[str(kohya), 0.5]]
