"""models/video_file.py: MP4 through ffmpeg (imageio-ffmpeg's binary), PNG frames without it."""

import json
import sys

import pytest
import torch

from models import media
from models import video_file as vf
from models.media import OutputError
from tests.test_media import SETTINGS, listing, pixels, refused, video


def needs_ffmpeg():
    if vf.ffmpeg_exe() is None:
        pytest.skip("imageio-ffmpeg (the io extra) is not installed")


# ---------------------------------------------------------------------------------------
# MP4 through imageio-ffmpeg
# ---------------------------------------------------------------------------------------


def test_mp4_streams_checks_and_keeps_settings(tmp_path):
    needs_ffmpeg()
    out = tmp_path / "v.mp4"
    kind, final = vf.video_target(out)
    assert (kind, final) == ("mp4", out)
    res = media.reserve(final, force=False)
    writer, message = vf.open_video(res, 16, 64, 48, SETTINGS)
    assert message == "" and isinstance(writer, vf.VideoWriter)
    with writer:
        writer.write(video(5))
        writer.write(video(4, start=5).numpy())  # numpy works too
        assert not out.exists()  # nothing under the final name before close
    assert listing(tmp_path) == ["v.mp4"]
    data = out.read_bytes()
    assert data[4:8] == b"ftyp"
    import imageio_ffmpeg

    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 9
    assert vf.read_mp4_metadata(out) == SETTINGS


def test_mp4_frames_decode_to_what_was_written(tmp_path):
    needs_ffmpeg()
    import imageio_ffmpeg

    out = tmp_path / "v.mp4"
    frames = video(3)
    with vf.VideoWriter(media.reserve(out, False), 8, 64, 48, {}) as writer:
        writer.write(frames)
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    assert meta["size"] == (64, 48)
    back = [torch.frombuffer(bytearray(f), dtype=torch.uint8).view(48, 64, 3) for f in reader]
    assert len(back) == 3
    for a, b in zip(back, frames):
        assert (a.int() - b.int()).abs().max() <= 3


def test_failing_ffmpeg_raises_and_leaves_nothing(tmp_path):
    needs_ffmpeg()
    out = tmp_path / "odd.mp4"
    with pytest.raises(OutputError, match="divisible by 2") as e:
        with vf.VideoWriter(media.reserve(out, False), 16, 63, 48, {}) as writer:
            writer.write(video(9, w=63))
    assert "nothing written" in str(e.value) and "\n" not in str(e.value)
    assert listing(tmp_path) == []


def test_failing_codec_keeps_old_file(tmp_path):
    needs_ffmpeg()
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old")
    res = media.reserve(out, force=True)
    with pytest.raises(OutputError, match="ffmpeg said: .*no_such_codec"):
        with vf.VideoWriter(res, 16, 64, 48, {}, codec="no_such_codec") as writer:
            writer.write(video(2))
    assert listing(tmp_path) == ["v.mp4"] and out.read_bytes() == b"old"


def test_frames_ffmpeg_dropped_are_caught(tmp_path, monkeypatch):
    """ffmpeg exits 0 with a valid MP4 of 3 frames (-frames:v 3): the read-back count differs."""
    needs_ffmpeg()
    params = vf.mp4_arguments
    monkeypatch.setattr(vf, "mp4_arguments", lambda *a: params(*a) + ["-frames:v", "3"])
    out = tmp_path / "v.mp4"
    with pytest.raises(OutputError, match="reads back 3 frames of the 9 written"):
        with vf.VideoWriter(media.reserve(out, False), 16, 64, 48, {}) as writer:
            writer.write(video(4))
            writer.write(video(5))
    assert listing(tmp_path) == []


def test_mp4_exception_while_writing_aborts(tmp_path):
    needs_ffmpeg()
    out = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError, match="decoder broke"):
        with vf.VideoWriter(media.reserve(out, False), 16, 64, 48, {}) as writer:
            writer.write(video(2))
            raise RuntimeError("decoder broke")
    assert listing(tmp_path) == []
    with pytest.raises(OutputError, match="aborted"):
        writer.close()


def test_mp4_wrong_frame_shape_is_refused(tmp_path):
    needs_ffmpeg()
    writer = vf.VideoWriter(media.reserve(tmp_path / "v.mp4", False), 16, 64, 48, {})
    with pytest.raises(ValueError, match=r"\(T, 48, 64, 3\)"):
        writer.write(video(2, h=64, w=48))
    assert listing(tmp_path) == []


def test_mp4_without_frames_is_not_committed(tmp_path):
    needs_ffmpeg()
    with pytest.raises(OutputError, match="no frames"):
        with vf.VideoWriter(media.reserve(tmp_path / "v.mp4", False), 16, 64, 48, {}):
            pass
    assert listing(tmp_path) == []


def test_parse_ffmetadata_escapes():
    text = ";FFMETADATA1\nk\\=ey=a\\=b\\;c\\#d\\\\e\\\nf\n# note\nplain=1\n[STREAM]\ns=2\n"
    assert vf.parse_ffmetadata(text) == {"k=ey": "a=b;c#d\\e\nf", "plain": "1"}


# ---------------------------------------------------------------------------------------
# fallback: PNG frames without imageio-ffmpeg
# ---------------------------------------------------------------------------------------


def test_frames_fallback_without_imageio_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails
    out = tmp_path / "v.mp4"
    kind, final = vf.video_target(out)
    assert (kind, final) == ("frames", tmp_path / "v_frames")
    res = vf.reserve_video(out, force=False)
    assert res.folder and res.path == final
    writer, message = vf.open_video(res, 16, 64, 48, SETTINGS)
    assert "pip install imageio-ffmpeg" in message and str(final) in message
    with writer:
        writer.write(video(2))
        writer.write(video(3, start=2).numpy())
        assert not final.exists()
    assert listing(tmp_path) == ["v_frames"]
    names = [f"frame_{i:05d}.png" for i in range(5)]
    assert listing(final) == names + ["settings.json"]
    settings = json.loads((final / "settings.json").read_text(encoding="utf-8"))
    assert settings == SETTINGS
    expected = video(5)
    for name, frame in zip(names, expected):
        data = (final / name).read_bytes()
        info = media.read_png(data)
        assert (info["width"], info["height"]) == (64, 48)
        rows = torch.frombuffer(bytearray(pixels(data)), dtype=torch.uint8).view(48, 1 + 64 * 3)
        assert torch.equal(rows[:, 1:].reshape(48, 64, 3), frame)
    with pytest.raises(OutputError, match="needs ffmpeg.*pip install imageio-ffmpeg"):
        vf.read_mp4_metadata(out)


def test_frames_fallback_force_and_interruption(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    final = tmp_path / "v_frames"
    with vf.open_video(tmp_path / "v.mp4", 16, 8, 8, {"run": 1})[0] as writer:
        writer.write(video(3, 8, 8))
    refused(tmp_path / "v_frames", False, "exists; not overwritten", folder=True)
    with pytest.raises(KeyboardInterrupt):  # an interrupted rerun leaves the old frames
        with vf.open_video(tmp_path / "v.mp4", 16, 8, 8, {"run": 2}, force=True)[0] as w:
            w.write(video(1, 8, 8))
            raise KeyboardInterrupt
    assert listing(tmp_path) == ["v_frames"] and len(listing(final)) == 4
    with vf.open_video(tmp_path / "v.mp4", 16, 8, 8, {"run": 3}, force=True)[0] as writer:
        writer.write(video(1, 8, 8))
    assert listing(tmp_path) == ["v_frames"]
    assert listing(final) == ["frame_00000.png", "settings.json"]
    assert json.loads((final / "settings.json").read_text()) == {"run": 3}


def test_force_never_replaces_a_foreign_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    (tmp_path / "v_frames").mkdir()
    (tmp_path / "v_frames" / "thesis.tex").write_text("precious")
    refused(tmp_path / "v_frames", True, "other than frames", folder=True)
    (tmp_path / "v_frames.mp4").mkdir()
    refused(tmp_path / "v_frames.mp4", True, "is a folder")  # an MP4 onto a folder
    (tmp_path / "f_frames").write_text("a file")
    refused(tmp_path / "f_frames", True, "is not a folder", folder=True)
