"""Argument types shared by the command lines (sample.py, train.py).

Each turns one command-line string into a value or raises argparse.ArgumentTypeError
with a message that says what was expected, so that argparse reports it in one line
and exits with code 2 before anything is loaded.
"""

import argparse

from models import sampling

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; keep them signed


def _error(msg: str):
    return argparse.ArgumentTypeError(msg)


def parse_size(text: str) -> tuple[int, int]:
    """'1024' or 'WIDTHxHEIGHT' px, multiples of 16 -> (H, W)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise _error(f"a size is N or WIDTHxHEIGHT, got {text!r}")
    w, h = (int(parts[0]), int(parts[-1]))
    try:
        return sampling.check_size((h, w))
    except ValueError as e:
        raise _error(str(e)) from None


def parse_levels(text: str) -> list[tuple[int, int]]:
    """'1024,4096' -> [(H, W), ...]: each level larger than the one before it (a level
    refines the previous one's result; a shrinking one would only throw detail away)."""
    levels = [parse_size(p) for p in text.split(",") if p.strip()]
    if not levels:
        raise _error("--levels is empty")
    for (ph, pw), (h, w) in zip(levels, levels[1:]):
        if h < ph or w < pw or (h, w) == (ph, pw):
            raise _error(
                f"level {w}x{h} after {pw}x{ph}: each level must be larger than the one "
                "before it (it refines that result)"
            )
    return levels


def parse_window(text: str) -> tuple[int, int]:
    """'16' or 'HxW' tokens."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise _error(f"a window is N or HxW tokens, got {text!r}")
    return int(parts[0]), int(parts[-1])


def parse_ratio(text: str):
    if text == "auto":
        return "auto"
    if not text.isdigit() or int(text) < 1:
        raise _error(f"ratio is a positive integer or 'auto', got {text!r}")
    return int(text)


def parse_shift(text: str):
    try:
        return sampling.parse_shift(text)
    except ValueError as e:
        raise _error(str(e)) from None


def parse_lora(text: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE'. A Windows drive letter ('C:\\x') is not taken for a scale,
    and neither is a ':' that is part of an existing file's name."""
    from pathlib import Path

    path, sep, scale = text.rpartition(":")
    if not sep or not path or scale.startswith(("\\", "/")) or Path(text).exists():
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise _error(f"{text!r}: the scale after ':' must be a number, got {scale!r}") from None


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise _error(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise _error(f"must be >= 1, got {n}")
    return n


def non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise _error(f"expected a whole number, got {text!r}") from None
    if n < 0:
        raise _error(f"must be >= 0, got {n}")
    return n


def non_negative_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise _error(f"expected a number, got {text!r}") from None
    if not x >= 0 or x == float("inf"):
        raise _error(f"must be a finite number >= 0, got {text}")
    return x


def parse_seed(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise _error(f"a seed is a whole number, got {text!r}") from None
    if not 0 <= n <= MAX_SEED:
        raise _error(f"a seed must be in 0..{MAX_SEED} (2^63 - 1), got {n}")
    return n


def positive_float(text: str) -> float:
    x = non_negative_float(text)
    if x == 0:
        raise _error("must be > 0")
    return x


def parse_frames(text: str) -> int:
    """A video frame count: 1 + 4k (the Wan VAE's)."""
    from models.wan_t2v import check_frames

    n = positive_int(text)
    try:
        return check_frames(n)
    except ValueError as e:
        raise _error(str(e)) from None
