"""One denoising step of full-size FLUX.1-dev (random bf16 weights) at 2K, 4K and 8K (GPU).

Rows (impl):
    hier       ours, UltraGen's joint sequence [512 text | guidance (ratio 4) | detail],
               16×16-token windows, IMAGE_RULE (the sampler's default: guidance scope
               aligned(1), halo 1), packed flex: detail sees the guidance window aligned
               with its own and those next to it (the paper's "scaled region")
    hier-all   the same with guidance scope `all` (ALL_GUIDANCE_RULE, the earlier
               image default): every detail query also sees every guidance token
    dense      ours, plain FLUX at the same resolution, dense SDPA
    diffusers  diffusers' FluxTransformer2DModel, dense (its default attention)
    no-attn    the hier step with attention replaced by the identity: the floor set by
               everything else (linear layers, norms, RoPE, modulation)
    e2e-hier   one 4K image at the defaults: 28 plain steps at 1K (guidance), warm start
               (upsample, skip 10 of 28), 18 hierarchical 4K steps, tiled AE decode
    e2e-dense  28 dense 4K steps (ours) and the same tiled decode
Text encoders are left out of both end-to-end rows (the same ~0.1 s for both).

    python bench/flux_step.py [--sizes 2048,4096,8192]
                              [--parts diffusers,ours,e2e (or e2e-hier, e2e-dense)]
                              [--out bench/results]
    python bench/flux_step.py --report   # table + targets from the recorded rows
"""

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/

import models.flux as flux_module  # noqa: E402
from attention import ALL_GUIDANCE_RULE, IMAGE_RULE, Layout, Plan  # noqa: E402
from models.autoencoder import PRESETS as AE_PRESETS  # noqa: E402
from models.autoencoder import AutoEncoder  # noqa: E402
from models.flux import PRESETS, Flux, image_ids, layout_ids, text_ids, to_layout  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
TEXT = 512


@torch.no_grad()
def randomise(model, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0, p.shape[1] ** -0.5, generator=g)
        elif "norm" in name or name.endswith("scale"):
            p.normal_(1, 0.1, generator=g)
        else:
            p.normal_(0, 0.02, generator=g)


def build(ctor):
    with torch.device("meta"):
        m = ctor()
    m = m.to_empty(device=DEV).to(BF16).eval().requires_grad_(False)
    randomise(m)
    return m


def timed(fn, repeat: int, warmup: bool = True):
    """(best ms of `repeat` runs after one warm-up, peak GiB during them)."""
    if warmup:
        fn()
        torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, torch.cuda.max_memory_allocated() / 2**30


def cond(g):
    txt = torch.randn(1, TEXT, 4096, device=DEV, generator=g).to(BF16)
    y = torch.randn(1, 768, device=DEV, generator=g).to(BF16)
    t = torch.tensor([0.5], device=DEV, dtype=BF16)
    return txt, y, t, torch.tensor([3.5], device=DEV, dtype=BF16)


def hier_inputs(size, g):
    side = size // 16
    layout = Layout(grid=(side, side), window=(16, 16), text=TEXT, ratio=4)
    detail = torch.randn(1, side * side, 64, device=DEV, generator=g).to(BF16)
    guidance = torch.randn(1, layout.n_guidance, 64, device=DEV, generator=g).to(BF16)
    img = to_layout(layout, detail, guidance)
    txt_ids, img_ids = layout_ids(layout, 1, DEV)
    return layout, img, img_ids, txt_ids


def ours_rows(sizes, repeat):
    model = build(lambda: Flux(PRESETS["flux-dev"]))
    g = torch.Generator(device=DEV).manual_seed(1)
    rows = []
    for size in sizes:
        rows += ours_hier(model, size, repeat, g)
        torch.cuda.empty_cache()
        rows += ours_dense(model, size, repeat, g)
        torch.cuda.empty_cache()
        print(rows[-3:], flush=True)
    return rows


def ours_hier(model, size, repeat, g):
    txt, y, t, gd = cond(g)
    layout, img, img_ids, txt_ids = hier_inputs(size, g)
    kw = dict(ntk_factor=10.0, n_guidance=layout.n_guidance)
    rows = []
    for impl, rule in [("hier", IMAGE_RULE), ("hier-all", ALL_GUIDANCE_RULE)]:
        plan = Plan(layout, rule)

        def step(p=plan):
            return model(img, img_ids, txt, txt_ids, t, y, gd, plan=p, **kw)

        ms, gib = timed(step, repeat)
        rows.append(dict(resolution=size, impl=impl, ms=ms, peak_gib=gib, tokens=layout.n))

    def hier():
        return model(img, img_ids, txt, txt_ids, t, y, gd, plan=Plan(layout, IMAGE_RULE), **kw)

    real_attend = flux_module.attend
    flux_module.attend = lambda q, k, v, plan=None: q  # attention skipped
    try:
        ms, gib = timed(hier, repeat)
    finally:
        flux_module.attend = real_attend
    rows.append(dict(resolution=size, impl="no-attn", ms=ms, peak_gib=gib, tokens=layout.n))
    return rows


def ours_dense(model, size, repeat, g):
    txt, y, t, gd = cond(g)
    side = size // 16
    img = torch.randn(1, side * side, 64, device=DEV, generator=g).to(BF16)
    ids, tids = image_ids(side, side, 1, DEV), text_ids(TEXT, 1, DEV)

    def dense():
        return model(img, ids, txt, tids, t, y, gd)

    row = dict(resolution=size, impl="dense", tokens=TEXT + side * side)
    return [dict(**row, **measure(dense, size, repeat))]


def measure(fn, size, repeat):
    try:
        big = size >= 8192  # a dense 8K step takes over a minute: once, kernels warm from 4K
        ms, gib = timed(fn, 1 if big else repeat, warmup=not big)
        return dict(ms=ms, peak_gib=gib)
    except torch.OutOfMemoryError:
        return dict(ms=None, peak_gib=None, note="out of memory")


def diffusers_rows(sizes, repeat):
    from diffusers import FluxTransformer2DModel

    model = build(lambda: FluxTransformer2DModel(guidance_embeds=True))
    g = torch.Generator(device=DEV).manual_seed(1)
    rows = []
    for size in sizes:
        rows.append(diffusers_step(model, size, repeat, g))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


def diffusers_step(model, size, repeat, g):
    txt, y, t, gd = cond(g)
    side = size // 16
    img = torch.randn(1, side * side, 64, device=DEV, generator=g).to(BF16)
    ids, tids = image_ids(side, side, 1, DEV)[0], text_ids(TEXT, 1, DEV)[0]

    def step():
        return model(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=ids,
            txt_ids=tids,
            guidance=gd,
        ).sample

    row = dict(resolution=size, impl="diffusers", tokens=TEXT + side * side)
    return dict(**row, **measure(step, size, repeat))


def sharpen(x, amount=0.5):
    """Unsharp mask on a latent: x + amount · (x − blur3x3(x))."""
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x + amount * (x - blur)


def e2e_rows(parts, steps=28, skip=10):
    """4K image at the defaults, and 28 dense 4K steps; both with the tiled AE decode."""
    model = build(lambda: Flux(PRESETS["flux-dev"]))
    ae = build(lambda: AutoEncoder(AE_PRESETS["flux"]))
    g = torch.Generator(device=DEV).manual_seed(2)
    txt, y, _, gd = cond(g)
    ts = torch.linspace(1, 0, steps + 1).tolist()
    one = torch.ones(1, device=DEV, dtype=BF16)

    def euler(x, call, first=0):
        for i in range(first, steps):
            x = x + (ts[i + 1] - ts[i]) * call(x, ts[i] * one)
        return x

    def decode(x, side):
        z = flux_module.unpack(x.float(), 2 * side, 2 * side).to(BF16)
        return ae.decode_tiled(z)

    def hier_image():
        s1 = 1024 // 16
        ids1, tids = image_ids(s1, s1, 1, DEV), text_ids(TEXT, 1, DEV)
        x1 = torch.randn(1, s1 * s1, 64, device=DEV, generator=g).to(BF16)
        x1 = euler(x1, lambda x, t: model(x, ids1, txt, tids, t, y, gd))  # stage 1, 1K
        side = 4096 // 16
        layout = Layout(grid=(side, side), window=(16, 16), text=TEXT, ratio=4)
        z1 = flux_module.unpack(x1, 2 * s1, 2 * s1)
        up = sharpen(F.interpolate(z1.float(), scale_factor=4, mode="bicubic"))
        t0 = ts[skip]
        noise = torch.randn(up.shape, device=DEV, generator=g)
        x2 = flux_module.pack(((1 - t0) * up + t0 * noise).to(BF16))
        guidance = flux_module.pack(z1)
        txt_ids, img_ids = layout_ids(layout, 1, DEV)
        plan, n_g = Plan(layout, IMAGE_RULE), layout.n_guidance

        def call(x, t):  # renoise mode: guidance noised to the current t
            gt = ((1 - t) * guidance + t * torch.randn_like(guidance)).to(BF16)
            img = to_layout(layout, x, gt)
            v = model(img, img_ids, txt, txt_ids, t, y, gd, plan=plan, ntk_factor=10.0,
                      n_guidance=n_g)  # fmt: skip
            return flux_module.from_layout(layout, v)[0]

        x2 = euler(x2, call, first=skip)
        return decode(x2, side)

    def dense_image():
        side = 4096 // 16
        ids, tids = image_ids(side, side, 1, DEV), text_ids(TEXT, 1, DEV)
        x = torch.randn(1, side * side, 64, device=DEV, generator=g).to(BF16)
        x = euler(x, lambda x, t: model(x, ids, txt, tids, t, y, gd))
        return decode(x, side)

    # one-off costs of a process (compiling the fused kernels and flex, the packed
    # plan) are paid before timing, as by a user's first image: warm-up steps at 1K/4K
    s1, s4 = 1024 // 16, 4096 // 16
    x1 = torch.randn(1, s1 * s1, 64, device=DEV, generator=g).to(BF16)
    with torch.no_grad():
        model(x1, image_ids(s1, s1, 1, DEV), txt, text_ids(TEXT, 1, DEV), one, y, gd)
        layout = Layout(grid=(s4, s4), window=(16, 16), text=TEXT, ratio=4)
        ti, ii = layout_ids(layout, 1, DEV)
        x4 = torch.randn(1, layout.n - TEXT, 64, device=DEV, generator=g).to(BF16)
        model(x4, ii, txt, ti, one, y, gd, plan=Plan(layout, IMAGE_RULE), ntk_factor=10.0,
              n_guidance=layout.n_guidance)  # fmt: skip
        ae.decode_tiled(torch.randn(1, 16, 128, 128, device=DEV, generator=g).to(BF16))
    del x1, x4
    rows = []
    runs = [("e2e-hier", hier_image), ("e2e-dense", dense_image)]
    for impl, fn in [r for r in runs if r[0] in parts]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        gib = torch.cuda.max_memory_allocated() / 2**30
        rows.append(dict(resolution=4096, impl=impl, ms=ms, peak_gib=gib))
        print(rows[-1], flush=True)
    return rows


TARGETS = {4096: 2.2, 8192: 4.5}  # hier speedup over diffusers dense (issue 4)
NO_ATTN_BOUND = 1.3  # hier time / no-attn time
E2E_TARGET = 3.0  # 28 dense 4K steps / the e2e hierarchical 4K image


def latest_rows(runs):
    """The newest row for each (resolution, impl) over the recorded runs."""
    rows = {}
    for run in runs:
        for r in run["rows"]:
            rows[r["resolution"], r["impl"]] = {**r, "date": run["date"], "command": run["command"]}
    return [rows[k] for k in sorted(rows)]


def targets(rows):
    ms = {(r["resolution"], r["impl"]): r["ms"] for r in rows}
    out = {}
    for impl in ("hier", "hier-all"):
        for size, want in TARGETS.items():
            h, d, f = ms.get((size, impl)), ms.get((size, "diffusers")), ms.get((size, "no-attn"))
            if h and (size, "diffusers") in ms:
                sp = d / h if d else None  # None: diffusers ran out of memory (target met)
                out[f"{impl} {size}: speedup vs diffusers >= {want}"] = dict(
                    value=None if sp is None else round(sp, 2), met=sp is None or sp >= want
                )
            if h and f:
                out[f"{impl} {size}: time / no-attn <= {NO_ATTN_BOUND}"] = dict(
                    value=round(h / f, 3), met=h / f <= NO_ATTN_BOUND
                )
    h, d = ms.get((4096, "e2e-hier")), ms.get((4096, "e2e-dense"))
    if h and d:
        out[f"e2e 4096: dense / hier >= {E2E_TARGET}"] = dict(
            value=round(d / h, 2), met=d / h >= E2E_TARGET
        )
    return out


def report(out: Path):
    """Set rows and targets in flux-step.json from its runs; print flux-step.md's tables."""
    path = out / "flux-step.json"
    data = json.loads(path.read_text())
    rows = latest_rows(data["runs"])
    data["rows"], data["targets"] = rows, targets(rows)
    path.write_text(json.dumps(data, indent=2) + "\n")
    ms = {(r["resolution"], r["impl"]): r["ms"] for r in rows}
    lines = ["| resolution | impl | ms | peak GiB | vs diffusers | date |", "|---" * 6 + "|"]
    for r in rows:
        d = ms.get((r["resolution"], "diffusers"))
        vs = f"{d / r['ms']:.2f}×" if d and r["ms"] and not r["impl"].startswith("e2e") else ""
        t = "out of memory" if r["ms"] is None else f"{r['ms']:.0f}"
        gib = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['resolution']} | {r['impl']} | {t} | {gib} | {vs} | {r['date']} |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for name, t in data["targets"].items():
        lines.append(f"| {name} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    commands = sorted({r["command"] for r in rows})
    print("\n".join(lines + ["", "commands:", *commands]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="2048,4096,8192", help="square image sides, pixels")
    ap.add_argument("--parts", default="diffusers,ours,e2e", help="which rows to run")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs after a warm-up")
    ap.add_argument("--out", default="bench/results", help="folder for flux-step.{json,md}")
    ap.add_argument("--report", action="store_true", help="print tables from the json, no GPU")
    args = ap.parse_args()
    if args.report:
        return report(Path(args.out))
    sizes = [int(s) for s in args.sizes.split(",")]
    parts = args.parts.split(",")
    rows = []
    if "diffusers" in parts:
        rows += diffusers_rows(sizes, args.repeat)
        torch.cuda.empty_cache()
    if "ours" in parts:
        rows += ours_rows(sizes, args.repeat)
        torch.cuda.empty_cache()
    if any(p.startswith("e2e") for p in parts):
        rows += e2e_rows([p for p in ("e2e-hier", "e2e-dense") if p in parts or "e2e" in parts])
    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        date=str(date.today()),
        command="python bench/flux_step.py " + " ".join(sys.argv[1:]),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "flux-step.json"
    old = json.loads(path.read_text()) if path.exists() else {"runs": []}
    old["runs"].append(dict(**meta, rows=[{**r, "device": meta["device"]} for r in rows]))
    path.write_text(json.dumps(old, indent=2) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
