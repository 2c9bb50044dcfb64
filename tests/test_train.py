"""train.py on CPU: overfitting, frozen base, exact resume, atomic checkpoints, bad data,
NaN stop, and the trained LoRA in sample.py. fp32 throughout (CPU default)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
import train
from attention import MaskRule, Plan
from models import lora, media, sampling
from models.flux import Flux, layout_ids, pack, preset

ROOT = Path(__file__).resolve().parents[1]


def write_png(path: Path, seed: int, h: int, w: int):
    g = torch.Generator().manual_seed(seed)
    rgb = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8)
    path.write_bytes(media.png_bytes(rgb, {}))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four captioned PNGs of different sizes, and a shared cache folder."""
    root = tmp_path_factory.mktemp("train")
    folder = root / "images"
    folder.mkdir()
    for i in range(4):
        write_png(folder / f"img{i}.png", i, 120 + 24 * i, 150)
        (folder / f"img{i}.txt").write_text(f"a test picture, number {i}")
    return folder, root / "cache"


def run(data, out, *extra, steps=6):
    folder, cache = data
    argv = ["--demo", "--data", str(folder), "--cache", str(cache), "--out", str(out)]
    argv += ["--size", "128", "--window", "4", "--steps", str(steps), "--lr", "1e-2", *extra]
    return train.main(argv)


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_overfitting_one_batch_lowers_the_loss_5x_and_only_the_lora_changes(monkeypatch):
    """50 AdamW steps on one fixed batch (fixed t and noise), renoise mode. The tiny
    preset cannot pass 2x here: its 32-wide stream makes every output token lie in a
    32-dimensional affine subspace of the 64 channels, so half of a random target's
    variance is out of reach whatever trains. So this runs the tiny preset widened to
    256 (8 heads, 2 + 4 blocks)."""
    cfg = preset("tiny", hidden_size=256, num_heads=8, depth=2, depth_single_blocks=4)
    cfg = preset("tiny", **{**cfg.__dict__, "axes_dim": (8, 12, 12)})
    torch.manual_seed(0)
    monkeypatch.setattr(train, "load_transformer", lambda args, device, dtype: Flux(cfg))
    args = train.build_parser().parse_args(
        ["--demo", "--data", ".", "--out", ".", "--size", "64", "--window", "4", "--ratio", "1"]
    )
    model, names = train.trainable_model(args, torch.device("cpu"))
    assert len(names) == 6 and model.gradient_checkpointing
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    layout = sampling.hierarchical_layout(args.size, cfg.t5_length, args.window, args.ratio)
    plan = Plan(layout, MaskRule(scope="aligned"), backend="reference")
    txt_ids, img_ids = layout_ids(layout, 1)
    setup = train.Setup(layout, plan, txt_ids, img_ids, 3.5, "renoise")
    g = torch.Generator().manual_seed(0)
    batch = dict(
        detail=torch.randn(1, 16, 8, 8, generator=g),
        guidance=torch.randn(1, 16, 8, 8, generator=g),
        txt=torch.randn(1, cfg.t5_length, cfg.context_in_dim, generator=g),
        y=torch.randn(1, cfg.vec_in_dim, generator=g),
    )
    t = torch.tensor([0.5])
    eps_d = torch.randn(pack(batch["detail"]).shape, generator=g)
    eps_g = torch.randn(pack(batch["guidance"]).shape, generator=g)
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-2, weight_decay=0.01)
    history = []
    for _ in range(50):
        opt.zero_grad()
        loss = train.flow_matching_loss(model, batch, setup, t, eps_d, eps_g)
        loss.backward()
        opt.step()
        history.append(loss.item())
    print("loss", history[0], "->", history[-1])
    assert history[0] / history[-1] >= 5
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # bit-identical base
    assert any(after[n].abs().sum() > 0 for n in trainable if ".lora_B." in n)


def test_resume_reproduces_the_uninterrupted_losses(data, tmp_path):
    extra = ("--batch-size", "2", "--grad-accum", "2", "--checkpoint-every", "2")
    assert run(data, tmp_path / "whole", *extra, steps=6) == 0
    assert run(data, tmp_path / "parts", *extra, steps=3) == 0  # checkpoint at 3
    assert run(data, tmp_path / "parts", *extra, "--resume", steps=6) == 0
    whole, parts = losses(tmp_path / "whole"), losses(tmp_path / "parts")
    assert sorted(parts) == list(range(1, 7))
    assert all(whole[s] == parts[s] for s in range(1, 7)), (whole, parts)  # exact
    assert len(set(whole.values())) > 1
    a = train.load_checkpoint(tmp_path / "whole" / train.CHECKPOINT)
    b = train.load_checkpoint(tmp_path / "parts" / train.CHECKPOINT)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert all(".lora_A." in k or ".lora_B." in k for k in a["lora"])


def test_a_crash_between_write_and_rename_keeps_the_previous_checkpoint(
    data, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    real = os.replace
    seen = []

    def crash_on_second_checkpoint(src, dst):
        if Path(dst).name == train.CHECKPOINT:
            seen.append(dst)
            if len(seen) == 2:
                raise OSError("simulated crash after the temporary file was written")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_checkpoint)
    with pytest.raises(OSError, match="simulated crash"):
        run(data, out, "--checkpoint-every", "2", steps=6)
    monkeypatch.setattr(os, "replace", real)
    assert (out / (train.CHECKPOINT + ".tmp")).exists()  # the new one, never renamed
    state = train.load_checkpoint(out / train.CHECKPOINT)
    assert state["step"] == 2
    assert run(data, out, "--checkpoint-every", "2", "--resume", steps=6) == 0
    assert train.load_checkpoint(out / train.CHECKPOINT)["step"] == 6
    assert (out / "lora.safetensors").exists()


def test_corrupt_and_uncaptioned_images_are_skipped_and_counted(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        write_png(folder / f"good{i}.png", i, 96, 96)
        (folder / f"good{i}.txt").write_text("fine")
    write_png(folder / "cut.png", 5, 96, 96)
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:200])  # truncated
    (folder / "cut.txt").write_text("truncated")
    (folder / "noise.jpg").write_bytes(os.urandom(500))
    (folder / "noise.txt").write_text("not an image")
    write_png(folder / "lonely.png", 6, 96, 96)  # no caption
    out = tmp_path / "run"
    data = (folder, tmp_path / "cache")
    assert run(data, out, steps=2) == 0
    err = capsys.readouterr().err
    assert "1 no caption (.txt), 2 unreadable image" in err and "data      2 images" in err
    assert len(list((tmp_path / "cache").glob("*.skip"))) == 2
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    data, tmp_path, monkeypatch, capsys
):
    real, calls = train.flow_matching_loss, []

    def nan_on_the_fourth(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(train, "flow_matching_loss", nan_on_the_fourth)
    out = tmp_path / "run"
    ckpt = out / train.CHECKPOINT
    code = run(data, out, "--checkpoint-every", "2", steps=6)
    assert code == 3
    assert "the loss is nan at step 4" in capsys.readouterr().err
    assert train.load_checkpoint(ckpt)["step"] == 2
    assert not (out / "lora.safetensors").exists()
    assert max(losses(out)) == 3


def test_the_trained_lora_loads_in_sample_py(data, tmp_path):
    out = tmp_path / "run"
    assert run(data, out, steps=4) == 0
    path = out / "lora.safetensors"
    model = Flux(preset("tiny"))
    names = lora.load_lora(model, path)
    assert len(names) == 4 and all(lora.lora_modules(model)[n].routed for n in names)
    assert any(m.lora_B.weight.abs().sum() > 0 for m in lora.lora_modules(model).values())
    common = ["flux", "--demo", "--levels", "64,128", "--steps", "3", "--seed", "1"]
    with_lora, without = tmp_path / "with.png", tmp_path / "without.png"
    assert sample.main([*common, "--guidance-lora", str(path), "--out", str(with_lora)]) == 0
    assert sample.main([*common, "--out", str(without)]) == 0
    assert with_lora.read_bytes() != without.read_bytes()  # the LoRA changed the image


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_stops(data, tmp_path, monkeypatch):
    real, calls = train.flow_matching_loss, []

    def interrupt_in_the_second_step(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag
        return real(*args, **kw)

    monkeypatch.setattr(train, "flow_matching_loss", interrupt_in_the_second_step)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    assert run(data, out, "--checkpoint-every", "100", steps=6) == 130
    assert signal.getsignal(signal.SIGINT) is before  # restored
    assert train.load_checkpoint(out / train.CHECKPOINT)["step"] == 2
    assert max(losses(out)) == 2 and not (out / "lora.safetensors").exists()


def test_the_trained_lora_loads_in_diffusers(data, tmp_path):
    """diffusers' FluxTransformer2DModel (tiny, random weights) with the trained file
    through load_lora_adapter == ours (the same weights through the key map) with it on
    every token, as diffusers does not route. fp32, max abs error <= 1e-5."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from models.keymaps import flux_from_diffusers
    from tests.test_flux import inputs, random_diffusers, run_diffusers
    from tests.test_lora import unroute

    out = tmp_path / "run"
    assert run(data, out, steps=3) == 0
    path = out / "lora.safetensors"
    cfg = preset("tiny")
    dm, sd = random_diffusers(cfg, seed=5)
    ours = Flux(cfg).eval()
    ours.load_state_dict(flux_from_diffusers(sd))
    x = inputs(cfg)
    with torch.no_grad():
        plain = ours(**x)
        lora.load_lora(ours, path)
        unroute(ours)
        want = ours(**x)
    assert (want - plain).abs().max() > 1e-3  # the trained LoRA changes the output
    dm.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True)
    with torch.no_grad():
        err = (run_diffusers(dm, x) - want).abs().max().item()
    assert err <= 1e-5, err


def test_an_existing_run_is_not_overwritten_without_resume(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(data, out, steps=1) == 0
    with pytest.raises(SystemExit):
        run(data, out, steps=2)
    assert "--resume" in capsys.readouterr().err


def test_stdlib_png_reader_matches_pillow(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    x = (torch.rand(37, 53, 3, generator=g) * 64).to(torch.uint8).cumsum(1).to(torch.uint8)
    for mode, arr in (("RGB", x), ("RGBA", torch.cat([x, x[..., :1]], -1)), ("L", x[..., 0])):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(arr.numpy(), mode).save(path, optimize=True)  # mixed row filters
        ours = train.read_png_pixels(path.read_bytes())
        with Image.open(path) as im:
            theirs = torch.tensor(list(im.convert("RGB").getdata()), dtype=torch.uint8)
        assert torch.equal(ours.reshape(-1, 3), theirs), mode


def test_two_processes_with_torchrun_gloo(data, tmp_path):
    """DDP over 2 CPU processes (gloo): both shards train, rank 0 writes the outputs."""
    folder, cache = data
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(ROOT / "train.py"), "--demo", "--data", str(folder), "--cache", str(cache),
           "--out", str(out), "--size", "128", "--window", "4", "--steps", "3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(out)) == [1, 2, 3]
    assert train.load_checkpoint(out / train.CHECKPOINT)["step"] == 3
    assert len(train.load_checkpoint(out / train.CHECKPOINT)["rng"]["ranks"]) == 2
