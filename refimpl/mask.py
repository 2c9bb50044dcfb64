"""Dense (N, N) attention mask from geometry, in raster order [text | guidance | detail].

Written without the attention package: every token's coordinates and window are
computed here directly from the grid sizes."""

import math

import torch


def _grid(dims):
    axes = [torch.arange(d) for d in dims]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def raster_mask(
    text,
    grid,
    window,
    ratio=None,
    *,
    scope="all",
    margin=1,
    neighbours="halo",
    halo=1,
    guidance_sees_text=True,
    detail_sees_text=True,
    text_sees_detail=False,
    shifted=False,
):
    """True where the query (row) may attend to the key (column).

    grid, window: 1 to 3 ints, right-aligned to (T, H, W). ratio: None, rs or (rt, rs).
    shifted: the odd layer of neighbours="shift" (windows moved by half a window on
    every axis with more than one window)."""
    grid = (1,) * (3 - len(grid)) + tuple(grid)
    window = (1,) * (3 - len(window)) + tuple(window)
    G, Wn = torch.tensor(grid), torch.tensor(window)

    # detail tokens: coordinates and window coordinates
    d_xyz = _grid(grid)
    d_win = d_xyz // Wn
    n_d = len(d_xyz)

    # guidance tokens, on the coarse grid
    if ratio is None:
        g_xyz = torch.zeros(0, 3, dtype=torch.long)
        g_win = g_xyz
    else:
        rt, rs = (1, ratio) if isinstance(ratio, int) else ratio
        r = torch.tensor([rt, rs, rs])
        r = torch.where(G == 1, 1, r)
        g_grid = [math.ceil(g / x) for g, x in zip(grid, r.tolist())]
        g_xyz = _grid(g_grid)
        g_win = g_xyz // (Wn // r)
    n_g = len(g_xyz)

    seg = torch.cat([torch.zeros(text), torch.ones(n_g), torch.full((n_d,), 2)]).long()
    is_t, is_g, is_d = seg == 0, seg == 1, seg == 2
    win = torch.cat([torch.full((text, 3), -1), g_win, d_win])  # window coords
    xyz = torch.cat([torch.zeros(text, 3, dtype=torch.long), g_xyz, d_xyz])

    qT, qG, qD = is_t[:, None], is_g[:, None], is_d[:, None]
    kT, kG, kD = is_t[None, :], is_g[None, :], is_d[None, :]

    m = qT & (kT | kG)
    m |= qG & kG
    if guidance_sees_text:
        m |= qG & kT
    if detail_sees_text:
        m |= qD & kT
    if text_sees_detail:
        m |= qT & kD
    if scope == "all":
        m |= qD & kG
    else:
        far = (win[:, None, :] - win[None, :, :]).abs().amax(-1)
        m |= qD & kG & (far <= margin)

    cell = win
    if shifted:
        s = torch.where(G > Wn, Wn // 2, 0)
        cell = (xyz + s) // Wn
    same = (cell[:, None, :] == cell[None, :, :]).all(-1)
    m |= qD & kD & same
    if neighbours == "halo":
        near = (xyz[:, None, :] - xyz[None, :, :]).abs().amax(-1) <= halo
        m |= qD & kD & near
    return m
