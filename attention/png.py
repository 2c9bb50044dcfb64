"""Write an 8-bit greyscale PNG: with Pillow when it is installed, else with zlib."""

import struct
import zlib

import numpy as np


def write_png(path, pixels: np.ndarray) -> None:
    """pixels: (H, W) uint8."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        Image.fromarray(pixels).save(path)  # uint8 (H, W) -> mode "L"
        return
    h, w = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))  # filter 0 per row

    def chunk(tag, data):
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b"")
        )
