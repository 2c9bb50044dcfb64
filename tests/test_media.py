"""models/media.py: PNG bytes, reserving outputs, the PNG writer."""

import os
import struct

import pytest
import torch

from models import media
from models.media import OutputError

SETTINGS = {
    "prompt": "a red fox in snow",
    "negative_prompt": "色调艳丽，过曝，静态，细节模糊不清",
    "odd": "a=b;c#d\\e\nf",
    "seed": 7,
    "levels": ["64x48"],
}


def pixels(data: bytes) -> bytes:
    """The decompressed image rows of a PNG written by media.png_bytes."""
    import zlib

    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    return zlib.decompress(idat)


def listing(folder) -> list[str]:
    """Every name in folder, hidden ones included, sorted."""
    return sorted(os.listdir(folder))


def video(t: int, h: int = 48, w: int = 64, start: int = 0) -> torch.Tensor:
    """uint8 (T, H, W, 3): flat frames of distinct grey levels (survive H.264 well)."""
    levels = torch.arange(start, start + t, dtype=torch.int32) * 25 % 256
    return levels.view(t, 1, 1, 1).expand(t, h, w, 3).to(torch.uint8).contiguous()


# ---------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------


def test_png_round_trip():
    rgb = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=torch.Generator())
    data = media.png_bytes(rgb, {"parameters": '{"a": 1}', "Comment": "hi"})
    info = media.read_png(data)
    assert (info["width"], info["height"], info["bit_depth"], info["color_type"]) == (7, 5, 8, 2)
    assert info["text"] == {"parameters": '{"a": 1}', "Comment": "hi"}
    rows = pixels(data)
    assert len(rows) == 5 * (1 + 7 * 3)
    assert rows[1 : 1 + 21] == rgb[0].flatten().numpy().tobytes()
    PIL = pytest.importorskip("PIL.Image")
    import io

    im = PIL.open(io.BytesIO(data))
    assert im.size == (7, 5) and im.mode == "RGB" and im.info["Comment"] == "hi"
    assert torch.equal(torch.tensor(list(im.getdata()), dtype=torch.uint8).view(5, 7, 3), rgb)


def test_write_png_commits_only_when_complete(tmp_path):
    rgb = torch.full((4, 6, 3), 200, dtype=torch.uint8)
    res = media.reserve(tmp_path / "x.png", force=False)
    assert listing(tmp_path) == [res.temp.name]  # claimed at once, under a hidden name
    assert res.temp.name.startswith(".x.part") and res.temp.suffix == ".png"
    assert media.write_png(res, rgb, {"parameters": "{}"}) == tmp_path / "x.png"
    assert listing(tmp_path) == ["x.png"]
    info = media.read_png((tmp_path / "x.png").read_bytes())
    assert (info["width"], info["height"], info["text"]) == (6, 4, {"parameters": "{}"})


def test_write_png_failure_leaves_nothing(tmp_path):
    res = media.reserve(tmp_path / "x.png", force=False)
    with pytest.raises(ValueError, match="expected"):
        media.write_png(res, torch.zeros(4, 6, 4, dtype=torch.uint8), {})
    assert listing(tmp_path) == []


@pytest.mark.parametrize("name", ["x.jpg", "x.PNGG", "x"])
def test_check_suffix_refuses_other_formats(tmp_path, name):
    with pytest.raises(OutputError, match=r"written as PNG only.*ending in \.png"):
        media.check_suffix(tmp_path / name, (".png",))
    assert media.check_suffix(tmp_path / "y.PNG", (".png",)) == tmp_path / "y.PNG"
    with pytest.raises(OutputError, match=r"MP4 only.*--out .*x\.mp4"):
        media.check_suffix(tmp_path / "x.gif", (".mp4",))


# ---------------------------------------------------------------------------------------
# reserve(): every refusal happens before anything is created
# ---------------------------------------------------------------------------------------


def refused(path, force, words, folder=False):
    """reserve() raises OutputError containing words, changing nothing around path."""
    parent = path.parent if path.parent.exists() else path.parent.parent
    before = listing(parent) if parent.is_dir() else None
    with pytest.raises(OutputError, match=words) as e:
        media.reserve(path, force, folder=folder)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    if before is not None:
        assert listing(parent) == before


def test_reserve_missing_folder(tmp_path):
    refused(tmp_path / "no" / "x.png", False, "folder .* does not exist \\(not created\\)")
    assert not (tmp_path / "no").exists()


def test_reserve_under_a_file(tmp_path):
    (tmp_path / "f").write_text("keep")
    refused(tmp_path / "f" / "x.png", True, "is a file, not a folder")
    refused(tmp_path / "f" / "sub" / "x.png", True, "is a file, not a folder")
    assert (tmp_path / "f").read_text() == "keep"


def test_reserve_existing_folder_even_with_force(tmp_path):
    (tmp_path / "d.png").mkdir()
    for force in (False, True):
        refused(tmp_path / "d.png", force, "is a folder; give a file name")
    assert (tmp_path / "d.png").is_dir()


def test_reserve_existing_file_needs_force(tmp_path):
    out = tmp_path / "x.png"
    out.write_bytes(b"old")
    refused(out, False, r"exists; not overwritten \(pass --force, or another --out\)")
    assert out.read_bytes() == b"old"


def test_reserve_proc_is_not_writable():
    refused(media.Path("/proc/x.png"), False, "not writable")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions"
)
def test_reserve_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(ro / "x.png", False, "is not writable")
    finally:
        ro.chmod(0o755)


def test_force_overwrites_only_at_commit(tmp_path):
    out = tmp_path / "x.png"
    out.write_bytes(b"old")
    res = media.reserve(out, force=True)
    res.temp.write_bytes(b"new")
    assert out.read_bytes() == b"old"  # untouched while the run goes on
    assert res.commit() == out
    assert out.read_bytes() == b"new" and listing(tmp_path) == ["x.png"]


def test_abort_leaves_nothing(tmp_path):
    res = media.reserve(tmp_path / "x.png", force=False)
    res.temp.write_bytes(b"half")
    res.abort()
    assert listing(tmp_path) == []


@pytest.mark.parametrize("existing", [None, b"old"])
def test_interrupted_write_keeps_final_name(tmp_path, existing):
    out = tmp_path / "x.png"
    if existing:
        out.write_bytes(existing)
    with pytest.raises(KeyboardInterrupt):
        with media.reserve(out, force=True) as res:
            res.temp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert listing(tmp_path) == (["x.png"] if existing else [])
    if existing:
        assert out.read_bytes() == existing


def test_leaving_the_block_without_commit_aborts(tmp_path):
    with media.reserve(tmp_path / "x.png", force=False) as res:
        res.temp.write_bytes(b"unfinished")
    assert listing(tmp_path) == []


def test_name_that_appears_meanwhile_is_kept(tmp_path):
    out = tmp_path / "x.png"
    res = media.reserve(out, force=False)
    res.temp.write_bytes(b"result")
    out.write_bytes(b"someone else's")
    with pytest.raises(OutputError, match=r"appeared while this ran.*nothing lost.*x\.part") as e:
        res.commit()
    assert out.read_bytes() == b"someone else's"
    kept = [n for n in listing(tmp_path) if n != "x.png"]
    assert len(kept) == 1 and kept[0].startswith("x.part") and kept[0].endswith(".png")
    assert kept[0] in str(e.value) and (tmp_path / kept[0]).read_bytes() == b"result"
