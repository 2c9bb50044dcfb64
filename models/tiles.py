"""Spatial tiles for the VAEs' tiled decode and encode: where tiles start, and the
linear-ramp weights that blend them (adding up to exactly 1 at every pixel).

    tile_starts     the FLUX AE's tiles: fixed size, starts spread evenly
    balanced_tiles  the Wan VAE's: the fewest tiles, all of one size, as small as possible
    tiling          a frame's tiles in raster order with their row and column weights
"""

import math

import torch
from torch import Tensor


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of size `tile` that cover [0, length) with neighbours
    overlapping by at least `overlap`, spread evenly (so the overlaps are about equal).
    One tile (of size `length`) when the length fits in one."""
    if length <= tile:
        return [0]
    n = 1 + math.ceil((length - tile) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def blend_weights(starts: list[int], size: int, length: int) -> list[Tensor]:
    """1-D weight of each tile over its `size` positions: a linear ramp across the part it
    shares with the previous and with the next tile, 1 elsewhere; then divided by the sum
    over tiles, so at every position of [0, length) the weights add up to exactly 1."""
    pos = torch.arange(size, dtype=torch.float32) + 0.5  # sample centres
    weights = []
    for i, s in enumerate(starts):
        w = torch.ones(size)
        if i > 0:  # shared with the previous tile: ramp up
            w = torch.minimum(w, pos / (starts[i - 1] + size - s))
        if i < len(starts) - 1:  # shared with the next tile: ramp down
            w = torch.minimum(w, pos.flip(0) / (s + size - starts[i + 1]))
        weights.append(w)
    total = torch.zeros(length)
    for s, w in zip(starts, weights):
        total[s : s + size] += w
    return [w / total[s : s + size] for s, w in zip(starts, weights)]


def check_tiling(tile: int, overlap: int) -> None:
    if not (isinstance(tile, int) and isinstance(overlap, int)):
        raise ValueError(f"tile and overlap must be ints, got tile={tile!r}, overlap={overlap!r}")
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got {tile=}, {overlap=}")


def balanced_tiles(length: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(starts, size): the fewest tiles of at most `tile` that cover [0, length) with
    neighbours overlapping by at least `overlap`, all of one size, as small as possible:

        n = ceil((length - overlap) / (tile - overlap))   (1 if length <= tile)
        size = ceil((length + (n - 1) * overlap) / n)     (<= tile)

    Starts spread evenly from 0 to length - size (steps differ by <= 1, so each is <= size
    - overlap). 4K latent (270 x 480), tile 160, overlap 8: 2 x 4 tiles of 139 x 126, 8%
    more pixels than the frame (fixed tiles of 144, same count: 28% more)."""
    check_tiling(tile, overlap)
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    if length <= tile:
        return [0], length
    n = -(-(length - overlap) // (tile - overlap))  # ceil, in integers
    size = -(-(length + (n - 1) * overlap) // n)
    # round(i * (length - size) / (n - 1)), in exact integer arithmetic
    return [(2 * i * (length - size) + n - 1) // (2 * (n - 1)) for i in range(n)], size


def check_tiles(tile, overlap, chunk) -> None:
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1 (latent frames per call), got {chunk!r}")
    if tile is None:
        return
    sides = (tile, tile) if isinstance(tile, int) else tile
    if not isinstance(sides, (tuple, list)) or len(sides) != 2:
        raise ValueError(f"tile must be None, an int or an (h, w) pair, got {tile!r}")
    for side in sides:
        check_tiling(side, overlap)


def tiling(h: int, w: int, tile, overlap: int, scale: int) -> list[tuple]:
    """The tiles of an h x w latent frame in raster order: (latent rows, latent columns,
    row weights, column weights), the weights at `scale` pixels per latent pixel (ramps
    adding up to 1 everywhere). tile=None: the whole frame, of weight exactly 1."""
    sides = (h, w) if tile is None else (tile, tile) if isinstance(tile, int) else tile
    axes = []
    for length, side in zip((h, w), sides):
        starts, size = ([0], length) if tile is None else balanced_tiles(length, side, overlap)
        weights = blend_weights([s * scale for s in starts], size * scale, length * scale)
        axes.append([(slice(s, s + size), wt) for s, wt in zip(starts, weights)])
    return [(ys, xs, wy, wx) for ys, wy in axes[0] for xs, wx in axes[1]]


def scaled(s: slice, f: int) -> slice:
    return slice(s.start * f, s.stop * f)
