"""Layout: one description of the joint self-attention sequence.

    [ text (L tokens) | guidance (coarse grid) | detail (full grid) ]

Grids are 3D (T, H, W): images have T = 1, a 1D sequence has T = H = 1. The detail grid
is cut into windows (cubes) of `window` tokens; border windows that do not divide
evenly are smaller (no padding, no cropping). Tokens are stored window-first: windows
in raster order over the window grid, tokens inside a window in raster order.

The guidance grid is the detail grid divided by the ratios (rt, rs, rs), rounded up,
and is cut into windows of window / ratio, so guidance window i covers the same region
as detail window i. RoPE positions live on the detail grid: guidance token (t, h, w)
sits at (t*rt, h*rs, w*rs), plus (r - 1) / 2 when `centre` is set.

"Raster order" is [text | guidance in raster order | detail in raster order]; `perm`
maps layout positions to raster positions, and `permute` / `unpermute` move (B, L, C)
tensors between the two.
"""

import math
from dataclasses import dataclass
from functools import cached_property

import torch

TEXT, GUIDANCE, DETAIL = 0, 1, 2
SEGMENT_NAMES = ("text", "guidance", "detail")


def _as3(x, name: str) -> tuple[int, int, int]:
    x = (x,) if isinstance(x, int) else tuple(int(v) for v in x)
    if not 1 <= len(x) <= 3 or any(v < 1 for v in x):
        raise ValueError(f"{name} must be 1 to 3 positive ints, got {x}")
    return (1,) * (3 - len(x)) + x


def _grid_coords(dims) -> torch.Tensor:
    """All coordinates of a (T, H, W) grid in raster order: (T*H*W, 3)."""
    axes = [torch.arange(d) for d in dims]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


@dataclass(frozen=True)
class Windows:
    """The windows of one grid, in window order (raster over the window grid)."""

    coords: torch.Tensor  # (n, 3) window-grid coordinates
    origin: torch.Tensor  # (n, 3) first token of the window on the token grid
    size: torch.Tensor  # (n, 3) window extent; border windows are smaller
    start: torch.Tensor  # (n,) offset of the window's first token in window-first order

    @property
    def volume(self) -> torch.Tensor:
        return self.size.prod(-1)


def cut_windows(grid, window) -> Windows:
    """Cut a token grid into windows; border windows keep what is left."""
    grid, window = torch.tensor(grid), torch.tensor(window)
    counts = (grid + window - 1) // window
    coords = _grid_coords(counts.tolist())  # (n, 3)
    origin = coords * window
    size = torch.minimum(window.expand_as(origin), grid - origin)
    volume = size.prod(-1)
    start = torch.cumsum(volume, 0) - volume
    return Windows(coords, origin, size, start)


def window_first(grid, window) -> torch.Tensor:
    """Raster index of the token at each window-first position: (n,)."""
    grid_t, window_t = torch.tensor(grid), torch.tensor(window)
    wins = cut_windows(grid, window)
    xyz = _grid_coords(grid)  # (n, 3) raster order
    wc = xyz // window_t  # window-grid coords of every token
    counts = (grid_t + window_t - 1) // window_t
    wid = (wc[:, 0] * counts[1] + wc[:, 1]) * counts[2] + wc[:, 2]
    local = xyz - wins.origin[wid]
    size = wins.size[wid]
    offset = (local[:, 0] * size[:, 1] + local[:, 1]) * size[:, 2] + local[:, 2]
    position = wins.start[wid] + offset  # window-first position of each raster token
    raster = torch.empty_like(position)
    raster[position] = torch.arange(len(position))
    return raster


@dataclass(frozen=True)
class Layout:
    """The joint sequence [text | guidance | detail]; see the module docstring.

    grid: detail token grid, 1 to 3 ints (W), (H, W) or (T, H, W).
    window: window (cube) size, same rank as grid.
    text: number of text tokens (0 when text enters by cross-attention).
    ratio: None (no guidance), rs, or (rt, rs): guidance is the detail grid / ratio.
    centre: place guidance RoPE positions at the centre of the region they cover.
    """

    grid: tuple
    window: tuple
    text: int = 0
    ratio: tuple | int | None = None
    centre: bool = False

    def __post_init__(self):
        grid = _as3(self.grid, "grid")
        window = _as3(self.window, "window")
        if self.text < 0:
            raise ValueError(f"text must be >= 0, got {self.text}")
        ratio = self.ratio
        if ratio is not None:
            rt, rs = (1, ratio) if isinstance(ratio, int) else tuple(ratio)
            if rt < 1 or rs < 1:
                raise ValueError(f"ratios must be >= 1, got {(rt, rs)}")
            # an axis of extent 1 has nothing to coarsen
            ratio = tuple(1 if g == 1 else r for g, r in zip(grid, (rt, rs, rs)))
            for axis, (w, r) in enumerate(zip(window, ratio)):
                if w % r:
                    raise ValueError(
                        f"window {window} is not divisible by ratio {ratio} on axis {axis}: "
                        "guidance windows must be whole tokens"
                    )
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "ratio", ratio)

    # ---- sizes -------------------------------------------------------------------
    @property
    def has_guidance(self) -> bool:
        return self.ratio is not None

    @property
    def guidance_grid(self) -> tuple[int, int, int]:
        if not self.has_guidance:
            return (0, 0, 0)
        return tuple(math.ceil(g / r) for g, r in zip(self.grid, self.ratio))

    @property
    def guidance_window(self) -> tuple[int, int, int]:
        return tuple(w // r for w, r in zip(self.window, self.ratio))

    @property
    def window_grid(self) -> tuple[int, int, int]:
        return tuple(math.ceil(g / w) for g, w in zip(self.grid, self.window))

    @property
    def n_text(self) -> int:
        return self.text

    @property
    def n_guidance(self) -> int:
        return math.prod(self.guidance_grid) if self.has_guidance else 0

    @property
    def n_detail(self) -> int:
        return math.prod(self.grid)

    @property
    def n(self) -> int:
        return self.n_text + self.n_guidance + self.n_detail

    @property
    def n_windows(self) -> int:
        return math.prod(self.window_grid)

    @property
    def guidance_start(self) -> int:
        return self.n_text

    @property
    def detail_start(self) -> int:
        return self.n_text + self.n_guidance

    @property
    def shift(self) -> tuple[int, int, int]:
        """Offset of the shifted (Swin) window grid: half a window on every axis that
        has more than one window; an axis covered by one window is not shifted."""
        return tuple(w // 2 if g > w else 0 for g, w in zip(self.grid, self.window))

    # ---- windows and order -------------------------------------------------------
    @cached_property
    def detail_windows(self) -> Windows:
        return cut_windows(self.grid, self.window)

    @cached_property
    def guidance_windows(self) -> Windows:
        wins = cut_windows(self.guidance_grid, self.guidance_window)
        if len(wins.start) != self.n_windows:
            raise AssertionError("guidance windows must pair one to one with detail windows")
        return wins

    @cached_property
    def perm(self) -> torch.Tensor:
        """(n,) raster position of the token at each layout position."""
        parts = [torch.arange(self.n_text)]
        if self.has_guidance:
            gw = window_first(self.guidance_grid, self.guidance_window)
            parts.append(self.guidance_start + gw)
        parts.append(self.detail_start + window_first(self.grid, self.window))
        return torch.cat(parts)

    @cached_property
    def inv_perm(self) -> torch.Tensor:
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.n)
        return inv

    # ---- per-token tables, in layout order ----------------------------------------
    @cached_property
    def segment(self) -> torch.Tensor:
        """(n,) segment id: TEXT, GUIDANCE or DETAIL."""
        sizes = torch.tensor([self.n_text, self.n_guidance, self.n_detail])
        return torch.repeat_interleave(torch.tensor([TEXT, GUIDANCE, DETAIL]), sizes)

    def _segment_tables(self, grid, windows: Windows):
        """Token coords (m, 3) and window ids (m,) of one windowed grid, window-first."""
        wid = torch.repeat_interleave(torch.arange(len(windows.start)), windows.volume)
        size, origin = windows.size[wid], windows.origin[wid]
        offset = torch.arange(len(wid)) - windows.start[wid]  # position inside the window
        plane = size[:, 1] * size[:, 2]
        local = torch.stack(
            [offset // plane, (offset % plane) // size[:, 2], offset % size[:, 2]], dim=-1
        )
        return origin + local, wid

    @cached_property
    def _tables(self):
        coords = [torch.zeros(self.n_text, 3, dtype=torch.long)]
        wids = [torch.full((self.n_text,), -1)]
        if self.has_guidance:
            c, w = self._segment_tables(self.guidance_grid, self.guidance_windows)
            coords.append(c)
            wids.append(w)
        c, w = self._segment_tables(self.grid, self.detail_windows)
        coords.append(c)
        wids.append(w)
        return torch.cat(coords), torch.cat(wids)

    @property
    def coords(self) -> torch.Tensor:
        """(n, 3) token coordinates on the token's own grid (text: zeros)."""
        return self._tables[0]

    @property
    def window_id(self) -> torch.Tensor:
        """(n,) window id; a guidance token carries the id of its aligned detail window;
        text tokens carry -1."""
        return self._tables[1]

    @cached_property
    def window_coords(self) -> torch.Tensor:
        """(n, 3) window-grid coordinates of each token's window (text: -1)."""
        wc = self.detail_windows.coords[self.window_id.clamp(min=0)]
        return torch.where(self.window_id[:, None] >= 0, wc, -1)

    @cached_property
    def shifted_cell(self) -> torch.Tensor:
        """(n,) id of each detail token's cell in the shifted window grid (others: -1)."""
        shift, window = torch.tensor(self.shift), torch.tensor(self.window)
        cells = (self.coords + shift) // window
        counts = (torch.tensor(self.grid) - 1 + shift) // window + 1
        cid = (cells[:, 0] * counts[1] + cells[:, 1]) * counts[2] + cells[:, 2]
        return torch.where(self.segment == DETAIL, cid, -1)

    def positions(self) -> torch.Tensor:
        """(n, 3) float64 RoPE positions (t, h, w) on the detail grid, layout order."""
        pos = self.coords.to(torch.float64)
        if self.has_guidance:
            ratio = torch.tensor(self.ratio, dtype=torch.float64)
            g = self.segment == GUIDANCE
            offset = (ratio - 1) / 2 if self.centre else torch.zeros(3, dtype=torch.float64)
            pos[g] = pos[g] * ratio + offset
        return pos

    # ---- moving tensors between raster and layout order ---------------------------
    def permute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Raster order -> layout (window-first) order along `dim`."""
        return x.index_select(dim, self.perm.to(x.device))

    def unpermute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Layout (window-first) order -> raster order along `dim`."""
        return x.index_select(dim, self.inv_perm.to(x.device))

    def describe(self) -> str:
        parts = [f"text {self.n_text}"]
        if self.has_guidance:
            parts.append(
                f"guidance {'x'.join(map(str, self.guidance_grid))} = {self.n_guidance} "
                f"(ratio t{self.ratio[0]} h{self.ratio[1]} w{self.ratio[2]})"
            )
        parts.append(f"detail {'x'.join(map(str, self.grid))} = {self.n_detail}")
        parts.append(
            f"windows {'x'.join(map(str, self.window))} -> "
            f"{'x'.join(map(str, self.window_grid))} = {self.n_windows}"
        )
        return ", ".join(parts) + f"; total {self.n} tokens"
