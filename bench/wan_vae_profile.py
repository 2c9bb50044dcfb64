"""Where the Wan VAE decode spends its time (GPU): variants timed, one decode profiled.

Full-size Wan2.1 VAE with random bf16 weights, one 1280x720 latent (one tile: the frame
fits the default tile), decoded by decode_video:
  variants  fused elementwise kernels on / off (models.flux.FUSE_ON_GPU), cuDNN autotuning
            (torch.backends.cudnn.benchmark) on / off, latent frames per call (chunk)
  profile   the CUDA kernels of one decode, summed by kind: convolutions, elementwise
            (fused and eager), copies (cat, the host transfer), attention, other

    python bench/wan_vae_profile.py [--frames 81] [--out bench/results]
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/

import models.flux as flux_module  # noqa: E402
from models.wan_vae import PRESETS, WanVAE  # noqa: E402

DEV = "cuda"


def build():
    with torch.device("meta"):
        vae = WanVAE(PRESETS["wan2.1"])
    vae = vae.to_empty(device=DEV).to(torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            elif "gamma" in name:
                p.normal_(1, 0.1, generator=g)
            else:
                p.normal_(0, 0.02, generator=g)
    return vae


def kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("conv", "cudnn", "implicit", "xmma", "sm90_", "sm80_", "gemm")):
        return "convolution"
    if any(k in n for k in ("fmha", "flash", "attention", "softmax")):
        return "attention"
    if any(k in n for k in ("memcpy", "cat", "copy", "memset")):
        return "copies"
    if n.startswith("triton"):
        return "elementwise (fused)"
    if any(k in n for k in ("elementwise", "vectorized", "reduce", "norm", "upsample", "pad")):
        return "elementwise (eager)"
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    vae = build()
    g = torch.Generator(device=DEV).manual_seed(1)
    T = 1 + (args.frames - 1) // 4
    z = torch.randn(1, 16, T, 90, 160, device=DEV, generator=g)
    rows = {}

    def run(label, chunk=1, fused=True, benchmark=False, repeat=2):
        flux_module.FUSE_ON_GPU = fused
        torch.backends.cudnn.benchmark = benchmark
        vae.decode_video(z[:, :, : 1 + chunk], tile=160, chunk=chunk)  # compile / tune
        best = float("inf")
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = vae.decode_video(z, tile=160, chunk=chunk)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        rows[label] = dict(seconds=best, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        print(label, rows[label], flush=True)
        return out

    ref = run("fused, chunk 1")
    run("eager elementwise, chunk 1", fused=False, repeat=1)
    run("fused, chunk 1, cudnn.benchmark", benchmark=True)
    run("fused, chunk 2, cudnn.benchmark", chunk=2, benchmark=True)
    out = run("fused, chunk 4, cudnn.benchmark", chunk=4, benchmark=True, repeat=1)
    rows["chunk 4 vs chunk 1 max abs"] = (out.float() - ref.float()).abs().max().item()

    # profile one decode of 5 latent frames (17 frames) in the first setting
    flux_module.FUSE_ON_GPU, torch.backends.cudnn.benchmark = True, True
    short = z[:, :, :5]
    vae.decode_video(short, tile=160)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        vae.decode_video(short, tile=160)
        torch.cuda.synchronize()
    by_kind, by_name = defaultdict(float), defaultdict(float)
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.device_type.name == "CUDA":
            by_kind[kind(e.key)] += t / 1e3
            by_name[e.key] += t / 1e3
    total = sum(by_kind.values())
    result = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, date=str(date.today()),
        command="python bench/wan_vae_profile.py " + " ".join(sys.argv[1:]),
        variants=rows, profile_ms=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        profile_total_ms=total,
        top_kernels_ms=dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:15]),
    )  # fmt: skip
    print(json.dumps(result, indent=2))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "wan-vae-profile.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
