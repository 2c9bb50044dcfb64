"""Hypothesis strategies for layouts and rules: odd sizes, single windows, border
windows, empty text, ratios 1/2/4, 1D/2D/3D grids."""

import math

from hypothesis import strategies as st

from attention import Layout, MaskRule


@st.composite
def layouts(draw, max_tokens=420, max_text=40):
    rank = draw(st.sampled_from([1, 2, 3]))
    spatial_ratio = draw(st.sampled_from([None, 1, 2, 4]))
    time_ratio = draw(st.sampled_from([1, 2])) if rank == 3 and spatial_ratio else 1
    ratio3 = (time_ratio, spatial_ratio or 1, spatial_ratio or 1)[3 - rank :]
    # windows: whole multiples of the ratio on each axis
    window = tuple(r * draw(st.integers(1, 3 if r > 1 else 6)) for r in ratio3)
    budget, grid = max_tokens, []
    for w in window:  # up to three windows and a border window per axis
        g = draw(st.integers(1, max(1, min(3 * w + 1, budget))))
        grid.append(g)
        budget = max(1, budget // g)
    grid = tuple(grid)
    if math.prod(grid) > max_tokens:
        grid = grid[:-1] + (max(1, max_tokens // math.prod(grid[:-1])),)
    text = draw(st.sampled_from([0, 0, 1, 5, max_text]))
    ratio = None
    if spatial_ratio:
        ratio = (time_ratio, spatial_ratio) if rank == 3 else spatial_ratio
    centre = draw(st.booleans())
    return Layout(grid=grid, window=window, text=text, ratio=ratio, centre=centre)


@st.composite
def rules(draw):
    neighbours = draw(st.sampled_from(["none", "halo", "shift"]))
    return MaskRule(
        scope=draw(st.sampled_from(["all", "aligned"])),
        margin=draw(st.integers(0, 2)),
        neighbours=neighbours,
        halo=draw(st.integers(0, 2)) if neighbours == "halo" else 1,
        guidance_sees_text=draw(st.booleans()),
        detail_sees_text=draw(st.booleans()),
        text_sees_detail=draw(st.booleans()),
    )


@st.composite
def plans(draw, max_tokens=420):
    """(layout, rule, shifted)."""
    layout = draw(layouts(max_tokens=max_tokens))
    rule = draw(rules())
    shifted = rule.neighbours == "shift" and draw(st.booleans())
    return layout, rule, shifted
