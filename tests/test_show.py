"""`python -m attention.show`: what it prints and the picture it writes."""

import builtins
import re
import struct
import zlib

import numpy as np
import pytest

from attention.png import write_png
from attention.show import main


def read_png(path):
    """(H, W) uint8 from an 8-bit greyscale PNG, filter type 0 rows (as write_png makes)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if tag == b"IHDR":
            size = struct.unpack(">IIBB", body[:10])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour = size
    assert (depth, colour) == (8, 0)
    rows = zlib.decompress(idat)
    return np.frombuffer(rows, np.uint8).reshape(h, w + 1)[:, 1:]


def test_stdlib_png_writer_without_pillow(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name.startswith("PIL"):
            raise ImportError("no Pillow here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    img = (np.arange(35 * 17) % 256).astype(np.uint8).reshape(35, 17)
    write_png(tmp_path / "x.png", img)
    assert np.array_equal(read_png(tmp_path / "x.png"), img)


def test_tiny_preset_prints_counts_and_writes_the_picture(tmp_path, capsys):
    path = tmp_path / "tiny.png"
    assert main(["--preset", "tiny", "--png", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "text 7 | guidance 60 | detail 240 | total 307" in out
    blocks = re.search(r"non-empty (\d+) = [\d.]+% \(full (\d+), partial (\d+)\)", out)
    assert blocks and int(blocks[1]) == int(blocks[2]) + int(blocks[3])
    assert re.search(r"allowed [\d,]+ of 94,249", out)
    # tiny: text 7 -> 1 block, guidance 60 -> 1 block, 9 windows of 32 -> 1 block each
    assert "packed    what attend runs: 1 call(s), 1,408 query / " in out
    assert path.exists() and path.stat().st_size > 0


def test_free_form_layout_and_rule(tmp_path, capsys):
    args = [
        "--grid",
        "3,20,24",
        "--window",
        "2,8,8",
        "--ratio",
        "2,4",
        "--scope",
        "aligned",
        "--margin",
        "0",
        "--neighbours",
        "none",
        "--no-png",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "guidance 2x5x6 = 60" in out and "guidance aligned(0), neighbours none" in out


def test_needs_a_preset_or_a_grid(capsys):
    with pytest.raises(SystemExit):
        main(["--window", "4,4"])
    assert "give --preset, or --grid and --window" in capsys.readouterr().err
