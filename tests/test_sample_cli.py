"""What a new user hits in sample.py: bad input is one clear line and exit code 2 before
any model loads, with nothing written and nothing lost; long prompts are said to be cut;
progress in a redirected log is whole lines; outputs stay out of the repository."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sample
from models import demo, media, video_file

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--levels", "64,256", "--window", "8", "--steps", "3", "--skip", "1"]


@pytest.fixture
def no_models(monkeypatch):
    """Any attempt to build or load a model fails the test."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(demo, "flux_models", boom)
    monkeypatch.setattr(demo, "wan_models", boom)
    import models.flux_files
    import models.wan_files

    monkeypatch.setattr(models.flux_files, "load_flux", boom)
    monkeypatch.setattr(models.wan_files, "load_wan", boom)


def refused(capsys, argv, words, folder=None):
    """main(argv) exits 2 with one line naming the problem, changing nothing in folder."""
    before = sorted(os.listdir(folder)) if folder else None
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sample.py") and "error" in lines[0]
    for w in words if isinstance(words, list) else [words]:
        assert w in lines[0], (w, lines[0])
    if folder:
        assert sorted(os.listdir(folder)) == before


# ---------------------------------------------------------------------------------------
# output paths
# ---------------------------------------------------------------------------------------


def test_unwritable_outputs_fail_before_loading(tmp_path, capsys, no_models):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "old.png").write_bytes(b"precious")
    flux = ["flux", "--demo", *SMALL]
    refused(capsys, [*flux, "--out", "/proc/x.png"], "not writable")
    refused(capsys, [*flux, "--out", str(tmp_path / "file" / "x.png")], "is a file", tmp_path)
    refused(capsys, [*flux, "--out", str(tmp_path / "dir.png"), "--force"], "is a folder", tmp_path)
    refused(capsys, [*flux, "--out", str(tmp_path / "no" / "x.png")], "does not exist", tmp_path)
    refused(capsys, [*flux, "--out", str(tmp_path / "old.png")], "exists", tmp_path)
    refused(capsys, [*flux, "--out", str(tmp_path / "x.jpg")], "PNG only", tmp_path)
    assert (tmp_path / "old.png").read_bytes() == b"precious"
    wan = ["wan", "--demo"]
    refused(capsys, [*wan, "--out", "/proc/x.mp4"], "not writable")
    refused(capsys, [*wan, "--out", str(tmp_path / "no" / "x.mp4")], "does not exist", tmp_path)
    refused(capsys, [*wan, "--out", str(tmp_path / "dir.mp4"), "--force"], "is a folder", tmp_path)
    refused(capsys, [*wan, "--out", str(tmp_path / "x.gif")], "MP4 only", tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path, capsys, no_models):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(capsys, ["flux", "--demo", "--out", str(ro / "x.png")], "not writable", ro)
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------------------------------
# numbers and files
# ---------------------------------------------------------------------------------------


def lora_files(tmp_path) -> dict:
    """A zero-byte file, garbage, a model checkpoint and a community (kohya) LoRA."""
    (tmp_path / "zero.safetensors").write_bytes(b"")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(300))
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{stem}.lora_down.weight": torch.zeros(2, 32),
               f"{stem}.lora_up.weight": torch.zeros(96, 2), f"{stem}.alpha": torch.tensor(2.0)},
              str(tmp_path / "style.safetensors"))  # fmt: skip
    return {k: str(tmp_path / f"{k}.safetensors") for k in ("zero", "garbage", "model", "style")}


def test_bad_numbers_and_files_fail_before_loading(tmp_path, capsys, no_models):
    out = ["--out", str(tmp_path / "x.png")]
    f = lora_files(tmp_path)
    flux = ["flux", "--demo", *out]
    refused(capsys, [*flux, "--steps", "0"], ["--steps", ">= 1"])
    refused(capsys, [*flux, "--base-steps", "0"], ["--base-steps", ">= 1"])
    refused(capsys, [*flux, "--steps", "4", "--skip", "4"], "--skip")
    refused(
        capsys, [*flux, "--seed", "99999999999999999999999"], ["--seed", "0..9223372036854775807"]
    )
    refused(capsys, [*flux, "--seed", "-1"], "--seed")
    refused(capsys, [*flux, "--levels", "512,128"], "larger than the one before")
    refused(capsys, [*flux, "--lora", f["style"] + ":abc"], ["scale", "'abc'"])
    refused(capsys, [*flux, "--lora", str(tmp_path / "none.safetensors")], "not found")
    refused(capsys, [*flux, "--lora", f["zero"]], ["--lora", "not a safetensors"])
    refused(capsys, [*flux, "--lora", f["garbage"]], ["--lora", "safetensors"])
    refused(capsys, [*flux, "--lora", f["model"]], ["--lora", "not a LoRA"])
    refused(capsys, [*flux, "--guidance-lora", f["zero"]], "--guidance-lora")
    refused(capsys, [*flux, "--guidance-lora", f["style"]], "not a guidance LoRA")
    assert sorted(os.listdir(tmp_path)) == sorted(Path(p).name for p in f.values())

    wan = ["wan", "--demo", "--out", str(tmp_path / "v.mp4")]
    refused(capsys, [*wan, "--frames", "80"], ["1 + 4k", "nearest: 77 or 81"])
    refused(capsys, [*wan, "--frames", "0"], "--frames")
    refused(capsys, [*wan, "--size", "840x480"], "multiples of 16")
    refused(capsys, [*wan, "--fps", "0"], ["--fps", ">= 1"])
    refused(capsys, [*wan, "--cfg", "-1"], ["--cfg", ">= 0"])
    refused(capsys, [*wan, "--shift", "0"], "--shift")
    refused(capsys, [*wan, "--steps", "0"], "--steps")
    refused(capsys, [*wan, "--seed", "2**70"], "--seed")
    assert not (tmp_path / "v.mp4").exists()


# ---------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------


def test_long_prompts_are_said_to_be_cut(tmp_path, capsys):
    prompt = " ".join(["a fox in the snow"] * 40)  # > 77 CLIP tokens, > 16 demo T5 tokens
    out = tmp_path / "p.png"
    assert sample.main(["flux", "--demo", *SMALL, "--prompt", prompt, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "the prompt (CLIP) has" in err and "cut to the encoder's 77" in err
    assert "the prompt (T5) has" in err
    meta = json.loads(media.read_png(out.read_bytes())["text"]["parameters"])
    assert meta["prompt"] == prompt  # recorded whole


def test_redirected_progress_is_whole_lines(tmp_path):
    """Run as a user would with stderr redirected to a file: no carriage returns, one
    progress line per reported step."""
    log = tmp_path / "log.txt"
    cmd = [sys.executable, str(REPO / "sample.py"), "flux", "--demo", *SMALL, "--out",
           str(tmp_path / "x.png"), "--seed", "1"]  # fmt: skip
    with open(log, "w") as f:
        r = subprocess.run(cmd, stderr=f, stdout=subprocess.DEVNULL, cwd=tmp_path)
    assert r.returncode == 0
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert any("level 2/2" in x and "step 1/2" in x for x in lines)
    assert any("level 2/2" in x and "2 steps in" in x for x in lines)


def test_progress_on_a_terminal_redraws_one_line():
    import io

    from models.progress import Progress

    buf = io.StringIO()
    bar = Progress("stage", 3, stream=buf, tty=True)
    for _ in range(3):
        bar.step()
    text = buf.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and "3 steps in" in text


def test_demo_output_stays_out_of_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sample.main(["flux", "--demo", *SMALL, "--seed", "5"]) == 0
    assert sorted(os.listdir(tmp_path / "outputs")) == ["demo-5-256x256.png"]
    assert "/outputs/" in (REPO / ".gitignore").read_text().split()
    r = subprocess.run(["git", "check-ignore", "-q", "outputs/x.png"], cwd=REPO)
    assert r.returncode == 0


def test_the_repository_stands_on_its_own():
    """No file points at a design document outside the repository; README says what
    works today (the video methods are not claimed)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    for name in files.stdout.split():
        if name.endswith((".py", ".md", ".toml")) and name != "tests/test_sample_cli.py":
            assert "DESIGN.md" not in (REPO / name).read_text(encoding="utf-8"), name
    first = (REPO / "README.md").read_text().split("\n\n")[1]
    assert "not yet" in first or "next" in first


# ---------------------------------------------------------------------------------------
# sample.py wan --demo
# ---------------------------------------------------------------------------------------

WAN_SMALL = ["--size", "64x48", "--frames", "9", "--steps", "3"]


def test_wan_demo_writes_mp4_with_settings_and_refuses_overwrite(tmp_path, capsys):
    if video_file.ffmpeg_exe() is None:
        pytest.skip("imageio-ffmpeg (the io extra) is not installed")
    out = tmp_path / "v.mp4"
    argv = ["wan", "--demo", *WAN_SMALL, "--seed", "7", "--cfg", "4", "--shift", "3",
            "--solver", "euler", "--fps", "12", "--out", str(out)]  # fmt: skip
    assert sample.main(argv) == 0
    err = capsys.readouterr().err
    assert "not a video" in err and "3 steps in" in err
    data = out.read_bytes()
    assert data[4:8] == b"ftyp" and video_file.count_frames(out) == 9
    meta = video_file.read_mp4_metadata(out)
    assert meta["seed"] == 7 and meta["demo"] is True and "not a video" in meta["warning"]
    s = meta["settings"]
    assert (s["size"], s["frames"], s["steps"], s["fps"]) == ("64x48", 9, 3, 12)
    assert (s["cfg"], s["shift"], s["solver"]) == (4.0, 3.0, "euler")
    assert s["negative_prompt"].startswith("色调艳丽")
    assert meta["sampling"]["solver"] == "euler"
    refused(capsys, [*argv[:-2], "--out", str(out), "--seed", "8"], "exists", tmp_path)
    assert out.read_bytes() == data


def test_wan_demo_without_imageio_ffmpeg_writes_frames(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    out = tmp_path / "v.mp4"
    assert sample.main(["wan", "--demo", *WAN_SMALL, "--seed", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "pip install imageio-ffmpeg" in err
    folder = tmp_path / "v_frames"
    assert sorted(os.listdir(tmp_path)) == ["v_frames"]
    names = sorted(os.listdir(folder))
    assert names == [f"frame_{i:05d}.png" for i in range(9)] + ["settings.json"]
    info = media.read_png((folder / names[0]).read_bytes())
    assert (info["width"], info["height"]) == (64, 48)
    meta = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    assert meta["seed"] == 2 and meta["settings"]["frames"] == 9


def test_wan_long_prompt_is_cut_with_a_word_before_umt5_loads(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    prompt = "snow " * 200  # the demo tokenizer spells by characters: > 512 tokens
    argv = ["wan", "--demo", *WAN_SMALL, "--prompt", prompt, "--out", str(out)]
    assert sample.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    cut = [
        i for i, x in enumerate(err) if "the prompt has" in x and "cut to the encoder's 512" in x
    ]
    umt5 = [i for i, x in enumerate(err) if x.startswith("text      umT5")]
    assert cut and umt5 and cut[0] < umt5[0]
