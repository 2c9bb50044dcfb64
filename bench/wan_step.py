"""Wan2.1-T2V-1.3B at full size with random bf16 weights: one denoising step and the VAE
decode, ours against diffusers in the same run (GPU). The baselines the video methods
compare to.

parts:
  step     one denoising step with classifier-free guidance (two forwards: the prompt's
           and the negative prompt's context) of ours (models/wan.py) and of diffusers'
           WanTransformer3DModel (its default attention), the same weights, at 832x480,
           1280x720 and 1920x1088, 81 frames; ours alone at 3840x2160x81, ONE forward
           (a CFG step is two of them). Rel. L2 of ours against diffusers on the step.
  vae720   the VAE decode of one 1280x720x81 latent: ours (decode_video, one tile: the
           frame fits the default tile) against diffusers' AutoencoderKLWan untiled and
           tiled, bf16, the same weights and latent; ours and diffusers' bf16 output
           against diffusers in fp32 (the yardstick).
  vae4k    ours at 3840x2160x81 with the default tile and the small-memory tile, each in
           a fresh process: seconds, peak GPU memory, and peak host memory (VmHWM) beyond
           the process before the decode and beyond the finished video.

    python bench/wan_step.py --parts step,vae720,vae4k [--out bench/results]
    python bench/wan_step.py --report        # tables from the recorded json, no GPU
"""

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/

from models.keymaps import wan_from_diffusers, wan_vae_from_diffusers  # noqa: E402
from models.wan import PRESETS, Wan  # noqa: E402
from models.wan_vae import PRESETS as VAE_PRESETS  # noqa: E402
from models.wan_vae import WanVAE  # noqa: E402

DEV, BF16 = "cuda", torch.bfloat16
GIB = 2**30
STEP_SIZES = [(480, 832), (720, 1280), (1088, 1920)]  # (H, W), 81 frames
FOURK = (2160, 3840)
FRAMES = 81
DEFAULT_TILE, SMALL_TILE = 160, 64


def latent_shape(size, frames=FRAMES):
    return (1, 16, 1 + (frames - 1) // 4, size[0] // 8, size[1] // 8)


@torch.no_grad()
def randomise(model, seed=0):
    """Matrices and conv kernels N(0, 1/fan_in), norms 1 + N(0, 0.1^2), modulation
    tables N(0, 1/dim), other vectors N(0, 0.02^2): activations of a sane size."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    for name, p in model.named_parameters():
        if "scale_shift_table" in name:
            p.normal_(0, p.shape[-1] ** -0.5, generator=g)
        elif p.ndim >= 2:
            p.normal_(0, p[0].numel() ** -0.5, generator=g)
        elif "norm" in name or "gamma" in name:
            p.normal_(1, 0.1, generator=g)
        else:
            p.normal_(0, 0.02, generator=g)


def timed(fn, repeat=1, warmup=False):
    """(best seconds, peak GiB allocated, the last result)."""
    if warmup:
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best, out = float("inf"), None
    for _ in range(repeat):
        out = None
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, torch.cuda.max_memory_allocated() / GIB, out


def rel_l2(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------
# step
# ---------------------------------------------------------------------------------------


def diffusers_wan():
    from diffusers import WanTransformer3DModel

    c = PRESETS["wan-t2v-1.3b"]
    with torch.device(DEV):
        m = WanTransformer3DModel(
            patch_size=c.patch_size, num_attention_heads=c.num_heads,
            attention_head_dim=c.head_dim, in_channels=c.in_dim, out_channels=c.out_dim,
            text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim,
            num_layers=c.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6,
        )  # fmt: skip
    m = m.to(BF16).eval().requires_grad_(False)
    randomise(m)
    return m


def part_step(rows: dict):
    theirs = diffusers_wan()
    with torch.device("meta"):
        ours = Wan(PRESETS["wan-t2v-1.3b"])
    ours.load_state_dict(wan_from_diffusers(theirs.state_dict()), strict=True, assign=True)
    ours = ours.eval().requires_grad_(False)
    g = torch.Generator(device=DEV).manual_seed(1)
    ctx = torch.zeros(2, 512, 4096, device=DEV, dtype=BF16)
    ctx[0, :40] = torch.randn(40, 4096, device=DEV, generator=g).to(BF16)  # the prompt
    ctx[1, :60] = torch.randn(60, 4096, device=DEV, generator=g).to(BF16)  # the negative
    t = torch.tensor([999.0], device=DEV)

    def step_ours(x):
        v, v0 = ours(x, t, ctx[:1]).float(), ours(x, t, ctx[1:]).float()
        return v0 + 5.0 * (v - v0)

    def step_theirs(x):
        f = lambda c: theirs(hidden_states=x, timestep=t, encoder_hidden_states=c).sample
        v, v0 = f(ctx[:1]).float(), f(ctx[1:]).float()
        return v0 + 5.0 * (v - v0)

    with torch.no_grad():
        small = torch.randn(latent_shape((240, 416), 9), device=DEV, generator=g).to(BF16)
        step_ours(small), step_theirs(small)  # compile / autotune outside the timings
        for size in STEP_SIZES:
            x = torch.randn(latent_shape(size), device=DEV, generator=g).to(BF16)
            reps = 2 if size[0] < 1000 else 1
            s_o, m_o, v_o = timed(lambda x=x: step_ours(x), reps)
            s_t, m_t, v_t = timed(lambda x=x: step_theirs(x), reps)
            key = f"{size[1]}x{size[0]}x{FRAMES}"
            rows[f"step {key}"] = dict(
                ours_s=s_o, ours_gib=m_o, diffusers_s=s_t, diffusers_gib=m_t,
                speedup=s_t / s_o, rel_l2=rel_l2(v_o, v_t),
                tokens=x.shape[2] * x.shape[3] * x.shape[4] // 4,
            )  # fmt: skip
            print(key, rows[f"step {key}"], flush=True)
            del v_o, v_t
        theirs = None  # freed for the 4K forward
        torch.cuda.empty_cache()
        x = torch.randn(latent_shape(FOURK), device=DEV, generator=g).to(BF16)
        s_o, m_o, _ = timed(lambda: ours(x, t, ctx[:1]))
        key = f"{FOURK[1]}x{FOURK[0]}x{FRAMES}"
        rows[f"forward {key}"] = dict(
            ours_s=s_o, ours_gib=m_o, tokens=x.shape[2] * x.shape[3] * x.shape[4] // 4,
            note="one forward (a CFG step is two)",
        )  # fmt: skip
        print(key, rows[f"forward {key}"], flush=True)


# ---------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------


def vaes():
    from diffusers import AutoencoderKLWan

    with torch.device(DEV):
        theirs = AutoencoderKLWan().eval().requires_grad_(False)
    randomise(theirs)
    with torch.device("meta"):
        ours = WanVAE(VAE_PRESETS["wan2.1"])
    ours.load_state_dict(wan_vae_from_diffusers(theirs.state_dict()), strict=True, assign=True)
    return ours.eval().requires_grad_(False).to(BF16), theirs


def part_vae720(rows: dict):
    ours, theirs = vaes()
    size = (720, 1280)
    g = torch.Generator(device=DEV).manual_seed(2)
    z = torch.randn(latent_shape(size), device=DEV, generator=g)
    mean = torch.tensor(VAE_PRESETS["wan2.1"].latents_mean, device=DEV).view(1, -1, 1, 1, 1)
    std = torch.tensor(VAE_PRESETS["wan2.1"].latents_std, device=DEV).view(1, -1, 1, 1, 1)
    z_raw = z * std + mean  # diffusers' pipeline un-normalises before decode

    with torch.no_grad():
        ref = theirs.decode(z_raw).sample.clamp(-1, 1).cpu()  # fp32 yardstick
        theirs.to(BF16)
        torch.cuda.empty_cache()
        dec = lambda: theirs.decode(z_raw.to(BF16)).sample
        theirs.decode(z_raw[:, :, :2, :32, :32].to(BF16))  # cudnn warm-up
        s_t, m_t, v_t = timed(dec)
        v_t = v_t.clamp(-1, 1).cpu()
        theirs.enable_tiling()
        s_tt, m_tt, _ = timed(dec)
        theirs = None  # freed before ours runs
        torch.cuda.empty_cache()
        run = lambda: ours.decode_video(z, tile=DEFAULT_TILE, overlap=8)
        ours.decode_video(z[:, :, :3, :32, :32], tile=DEFAULT_TILE)  # compile outside timing
        s_o, m_o, v_o = timed(run, repeat=2)
    e_o, e_t = rel_l2(v_o, ref), rel_l2(v_t, ref)
    rows["vae 1280x720x81"] = dict(
        ours_s=s_o, ours_gib=m_o, diffusers_s=s_t, diffusers_gib=m_t,
        diffusers_tiled_s=s_tt, diffusers_tiled_gib=m_tt, speedup=s_t / s_o,
        ours_vs_fp32=e_o, diffusers_bf16_vs_fp32=e_t, ours_vs_diffusers_bf16=rel_l2(v_o, v_t),
        max_abs_ours_vs_fp32=(v_o.float() - ref).abs().max().item(),
        tolerance_passed=e_o <= 1.5 * e_t + 1e-3,
    )  # fmt: skip
    print("vae 720p", rows["vae 1280x720x81"], flush=True)


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def one_vae4k(tile: int) -> dict:
    """In a fresh process: decode a 3840x2160x81 latent with `tile`."""
    with torch.device("meta"):
        vae = WanVAE(VAE_PRESETS["wan2.1"])
    vae = vae.to_empty(device=DEV).to(BF16).eval().requires_grad_(False)
    randomise(vae)
    g = torch.Generator(device=DEV).manual_seed(3)
    z = torch.randn(latent_shape(FOURK), device=DEV, generator=g)
    with torch.no_grad():
        vae.decode_video(z[:, :, :3, :40, :40], tile=tile)  # compile outside the timing
    torch.cuda.synchronize()
    before = rss("VmRSS")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        video = vae.decode_video(z, tile=tile, overlap=8)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    video_bytes = video.numel() * video.element_size()
    peak = rss("VmHWM")
    return dict(
        tile=tile, seconds=seconds, gpu_gib=torch.cuda.max_memory_allocated() / GIB,
        gpu_reserved_gib=torch.cuda.max_memory_reserved() / GIB, video_gib=video_bytes / GIB,
        video_dtype=str(video.dtype), host_beyond_video_gib=(peak - before - video_bytes) / GIB,
        host_peak_gib=peak / GIB, finite=bool(torch.isfinite(video).all()),
    )  # fmt: skip


def part_vae4k(rows: dict, tiles):
    for tile in tiles:
        cmd = [sys.executable, __file__, "--one-vae4k", str(tile)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            print(out.stdout, out.stderr, flush=True)
            rows[f"vae 3840x2160x81 tile {tile}"] = dict(error=out.stderr[-2000:])
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows[f"vae 3840x2160x81 tile {tile}"] = row
        print("vae 4k", row, flush=True)


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------


def report(out: Path) -> str:
    data = json.loads((out / "wan-step.json").read_text())
    r = data["rows"]
    md = [
        "# Wan2.1-T2V-1.3B: one denoising step and the VAE decode, ours vs diffusers",
        "",
        f"- device: {data['device']}; torch {data['torch']}; date {data['date']}",
        f"- commands: {'; '.join(f'`{c}`' for c in data['commands'])}",
        "- random bf16 weights (diffusers' models, randomised: matrices N(0, 1/fan_in)); ours "
        "loaded from their state dicts through models/keymaps.py; batch 1",
        "",
        "## Transformer: one step with classifier-free guidance (two forwards)",
        "",
        "| size | tokens | ours | diffusers | speedup | ours peak | diffusers peak | rel. L2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, v in r.items():
        if k.startswith("step "):
            md.append(
                f"| {k[5:]} | {v['tokens']:,} | {v['ours_s']:.2f} s | {v['diffusers_s']:.2f} s "
                f"| {v['speedup']:.2f}x | {v['ours_gib']:.1f} GiB | {v['diffusers_gib']:.1f} "
                f"GiB | {v['rel_l2']:.1e} |"
            )
    for k, v in r.items():
        if k.startswith("forward "):
            md += ["", f"{k[8:]} ({v['tokens']:,} tokens), ours, {v['note']}: "
                   f"{v['ours_s']:.1f} s, peak {v['ours_gib']:.1f} GiB."]  # fmt: skip
    md += ["", "## VAE decode (bf16)", ""]
    v = r.get("vae 1280x720x81")
    if v:
        md += [
            "1280x720x81, the same latent and weights:",
            "",
            "| | seconds | peak GPU | rel. L2 to diffusers fp32 |",
            "|---|---|---|---|",
            f"| ours (decode_video, one tile, to host fp16) | {v['ours_s']:.2f} | "
            f"{v['ours_gib']:.1f} GiB | {v['ours_vs_fp32']:.2e} |",
            f"| diffusers AutoencoderKLWan, untiled | {v['diffusers_s']:.2f} | "
            f"{v['diffusers_gib']:.1f} GiB | {v['diffusers_bf16_vs_fp32']:.2e} |",
            f"| diffusers, enable_tiling() | {v['diffusers_tiled_s']:.2f} | "
            f"{v['diffusers_tiled_gib']:.1f} GiB | |",
            "",
            f"Ours is {v['speedup']:.2f}x faster than diffusers untiled. Tolerance (bf16): "
            "ours within 1.5x diffusers' own bf16 error against fp32 (+1e-3): "
            + ("**passed**" if v["tolerance_passed"] else "**FAILED**")
            + f"; ours vs diffusers bf16 {v['ours_vs_diffusers_bf16']:.2e}, max abs ours vs "
            f"fp32 {v['max_abs_ours_vs_fp32']:.3f}.",
            "",
        ]
    rows4k = [(k, v) for k, v in r.items() if k.startswith("vae 3840")]
    if rows4k:
        md += [
            "3840x2160x81 (ours; each in a fresh process; host memory beyond the process "
            "before the decode and beyond the finished video):",
            "",
            "| tile (latent px) | seconds | peak GPU allocated | reserved | host beyond video "
            "| video on host |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in rows4k:
            if "error" in v:
                md.append(f"| {k} | error | | | | |")
                continue
            md.append(
                f"| {v['tile']} | {v['seconds']:.1f} | {v['gpu_gib']:.1f} GiB | "
                f"{v['gpu_reserved_gib']:.1f} GiB | {v['host_beyond_video_gib']:.2f} GiB | "
                f"{v['video_gib']:.2f} GiB {v['video_dtype']} |"
            )
    text = "\n".join(md) + "\n"
    (out / "wan-step.md").write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default="step,vae720,vae4k")
    ap.add_argument("--tiles", default=f"{DEFAULT_TILE},{SMALL_TILE}", help="vae4k tiles")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--report", action="store_true", help="write the md from the json, no GPU")
    ap.add_argument("--one-vae4k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_vae4k:
        print(json.dumps(one_vae4k(args.one_vae4k)))
        return
    out = Path(args.out)
    if args.report:
        print(report(out))
        return
    path = out / "wan-step.json"
    data = json.loads(path.read_text()) if path.exists() else dict(rows={}, commands=[])
    data.update(
        device=torch.cuda.get_device_name(), torch=torch.__version__, date=str(date.today())
    )
    data["commands"].append("python bench/wan_step.py " + " ".join(sys.argv[1:]))
    parts = args.parts.split(",")
    for name, fn in [
        ("vae720", part_vae720),
        ("vae4k", lambda rows: part_vae4k(rows, [int(t) for t in args.tiles.split(",")])),
        ("step", part_step),
    ]:
        if name in parts:
            fn(data["rows"])
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2) + "\n")
            torch.cuda.empty_cache()
    print(report(out))


if __name__ == "__main__":
    main()
