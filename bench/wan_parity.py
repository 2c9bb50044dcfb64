"""Full-size Wan2.1-T2V-1.3B forward, ours vs diffusers, random weights (GPU).

One set of random weights (diffusers' WanTransformer3DModel at the 1.3B config, each
matrix N(0, 1/fan_in), biases N(0, 0.02²), norm weights 1 + N(0, 0.1²), modulation
tables N(0, 1/dim)); one 480p × 81-frame input: latent (1, 16, 21, 60, 104), 32,760
tokens, a 512-row context (40 prompt rows, the rest zero, as the pipeline pads it),
t = 500. Outputs:
    ref    diffusers in fp32 (the yardstick)
    diff   diffusers in bf16
    ours   ours in bf16, from the same weights through the diffusers -> Wan key map
The bf16 tolerance is relative: ours must be as close to the fp32 output as diffusers'
own bf16 run is (err(ours) <= 1.5 · err(diff) + 1e-3), and within 2e-2 relative L2 of
diffusers bf16. (Ours keeps the residual stream in fp32, as the original Wan code does;
diffusers rounds it to bf16 after every sub-layer.)

    python bench/wan_parity.py [--out bench/results]
"""

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/

from models.keymaps import wan_from_diffusers  # noqa: E402
from models.wan import PRESETS, Wan  # noqa: E402


def stats(a, b):
    a, b = a.float(), b.float()
    return dict(
        rel_l2=((a - b).norm() / b.norm()).item(),
        max_abs=(a - b).abs().max().item(),
        cos=torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item(),
    )


@torch.no_grad()
def randomise(model, dim, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    for name, p in model.named_parameters():
        if "scale_shift_table" in name:
            p.normal_(0, dim**-0.5, generator=g)
        elif p.ndim >= 2:
            p.normal_(0, p[0].numel() ** -0.5, generator=g)  # 1 / fan_in (conv: in·k)
        elif "norm" in name:
            p.normal_(1, 0.1, generator=g)
        else:
            p.normal_(0, 0.02, generator=g)


def timed(fn, n=3):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="bench/results", help="folder for wan-parity.{md,json}")
    args = ap.parse_args()
    from diffusers import WanTransformer3DModel

    config = PRESETS["wan-t2v-1.3b"]
    with torch.device("cuda"):  # not meta: its RoPE tables are buffers built at init
        theirs = WanTransformer3DModel(
            patch_size=config.patch_size,
            num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim,
            in_channels=config.in_dim,
            out_channels=config.out_dim,
            text_dim=config.text_dim,
            freq_dim=config.freq_dim,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
        )
    theirs = theirs.eval()
    randomise(theirs, config.dim)

    g = torch.Generator(device="cuda").manual_seed(1)
    latent = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=g)
    context = torch.zeros(1, config.text_len, config.text_dim, device="cuda")
    context[:, :40] = torch.randn(1, 40, config.text_dim, device="cuda", generator=g)
    t = torch.tensor([500.0], device="cuda")

    def run_theirs(dtype):
        return theirs(
            hidden_states=latent.to(dtype), timestep=t, encoder_hidden_states=context.to(dtype)
        ).sample

    bf16 = torch.bfloat16
    with torch.no_grad():
        ref = run_theirs(torch.float32).float()
        theirs.to(bf16)
        torch.cuda.empty_cache()
        diff = run_theirs(bf16)
        with torch.device("meta"):
            ours = Wan(config)
        sd = wan_from_diffusers(theirs.state_dict())
        ours.load_state_dict(sd, strict=True, assign=True)
        ours = ours.eval()
        out = ours(latent.to(bf16), t, context.to(bf16))
        ms_ours = timed(lambda: ours(latent.to(bf16), t, context.to(bf16)))
        ms_theirs = timed(lambda: run_theirs(bf16))

    err_ours, err_diff, vs_diff = stats(out, ref), stats(diff, ref), stats(out, diff)
    ok = (
        err_ours["rel_l2"] <= 1.5 * err_diff["rel_l2"] + 1e-3
        and vs_diff["rel_l2"] <= 2e-2
        and torch.isfinite(out).all().item()
    )
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        date=str(date.today()),
        command="python bench/wan_parity.py",
        latent=list(latent.shape),
        tokens=21 * 30 * 52,
        ref_rms=ref.pow(2).mean().sqrt().item(),
        ours_vs_fp32=err_ours,
        diffusers_bf16_vs_fp32=err_diff,
        ours_vs_diffusers_bf16=vs_diff,
        ms=dict(ours=ms_ours, diffusers=ms_theirs),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        passed=ok,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "wan-parity.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("ours bf16 vs diffusers fp32", err_ours),
        ("diffusers bf16 vs diffusers fp32", err_diff),
        ("ours bf16 vs diffusers bf16", vs_diff),
    ]
    md = [
        "# Wan2.1-T2V-1.3B full-size forward: ours vs diffusers (random weights)",
        "",
        f"- device: {result['device']}; torch {result['torch']}; date {result['date']}",
        f"- command: `{result['command']}`",
        "- input: 480p × 81 frames = latent (1, 16, 21, 60, 104), 32,760 tokens; context 512 "
        "rows (40 random, the rest zero); t = 500; batch 1",
        "- weights: diffusers WanTransformer3DModel (1.3B), random (see the script); ours "
        "loaded from its state dict through models/keymaps.wan_from_diffusers",
        f"- RMS of the fp32 output: {result['ref_rms']:.4g}",
        "",
        "| comparison | rel. L2 | max abs | cosine |",
        "|---|---|---|---|",
        *[f"| {n} | {s['rel_l2']:.3e} | {s['max_abs']:.3e} | {s['cos']:.6f} |" for n, s in rows],
        "",
        "Tolerance (bf16): ours within 1.5× diffusers' own bf16 error against fp32 (+1e-3), "
        "and within 2e-2 relative L2 of diffusers bf16: " + ("**passed**" if ok else "**FAILED**"),
        "",
        f"Forward time (bf16, best of 3): ours {ms_ours:.0f} ms, diffusers {ms_theirs:.0f} ms. "
        f"Peak memory {result['peak_gib']:.1f} GiB.",
        "",
    ]
    (out_dir / "wan-parity.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
