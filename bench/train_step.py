"""train.py at full size on one GPU: flux-dev with random bf16 weights (GPU).

The real training loop (train.main), 1024 px detail + 256 px guidance, batch 1, the
routed rank-16 guidance LoRA, AdamW, bf16 autocast; with gradient checkpointing (the
default) and, as the baseline of the same run, without it. The cache holds random
latents and text states of the right shapes (the encoders are not what is measured),
and the transformer is built with random weights instead of being read from a file.
Writes train.{json,md} to --out.

    python bench/train_step.py [--steps 20] [--out bench/results]
    python bench/train_step.py --preset tiny --size 128 --steps 3 --out /tmp/b  # dry run
"""

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/

import train  # noqa: E402
from bench import flux_step  # noqa: E402
from models.flux import PRESETS, Flux  # noqa: E402


def fake_cache(args_list: list[str], cfg, size: int) -> None:
    """Caption files and cache entries named as train.build_cache names them."""
    args = train.build_parser().parse_args(args_list)
    g = torch.Generator().manual_seed(0)
    guide = size // args.ratio
    for i in range(4):
        image = Path(args.data) / f"img{i}.png"
        image.write_bytes(b"not read: the cache entry exists")
        image.with_suffix(".txt").write_text(f"caption {i}")
        tensors = dict(
            detail=torch.randn(16, size // 8, size // 8, generator=g),
            guidance=torch.randn(16, guide // 8, guide // 8, generator=g),
            txt=torch.randn(cfg.t5_length, cfg.context_in_dim, generator=g).to(torch.bfloat16),
            y=torch.randn(cfg.vec_in_dim, generator=g).to(torch.bfloat16),
        )
        name = train.cache_name(image, f"caption {i}", args)
        Path(args.cache).mkdir(exist_ok=True)
        save_file(tensors, str(Path(args.cache) / name))


def common(root: Path, size: int) -> list[str]:
    return ["--transformer", "random-model", "--data", str(root / "data"), "--size", str(size),
            "--cache", str(root / "cache"), "--device", flux_step.DEV]  # fmt: skip


def one_run(model, root: Path, size: int, steps: int, checkpointing: bool) -> dict:
    out = root / ("ckpt" if checkpointing else "no-ckpt")
    argv = common(root, size) + ["--out", str(out), "--steps", str(steps)]
    argv += ["--checkpoint-every", str(steps), "--lr", "1e-4", "--precision", "bf16"]
    if not checkpointing:
        argv.append("--no-grad-checkpointing")
    for n, p in list(model.named_parameters()):  # a fresh LoRA each run
        if p.requires_grad:
            raise RuntimeError(f"{n}: the base must come back frozen")
    cuda = flux_step.DEV == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        code = train.main(argv)
        oom = None
    except torch.OutOfMemoryError as e:
        code, oom = None, str(e).splitlines()[0]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    strip_lora(model)
    if oom:
        return dict(checkpointing=checkpointing, note=f"out of memory: {oom}", peak_gib=peak)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    secs = [r["seconds"] for r in rows]
    warm = secs[5:] if len(secs) > 5 else secs
    return dict(
        checkpointing=checkpointing,
        exit_code=code,
        steps=len(rows),
        first_step_s=secs[0],
        s_per_step=sum(warm) / len(warm),
        s_per_step_from="steps 6.." if len(secs) > 5 else "all steps",
        peak_gib=peak,
        losses=[r["loss"] for r in rows],
    )


def strip_lora(model) -> None:
    """Undo add_guidance_lora: the plain Linears back, sharing the same base weights."""
    from models.lora import lora_modules

    for name, m in lora_modules(model).items():
        plain = torch.nn.Linear(m.in_features, m.out_features, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    model.gradient_checkpointing = False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024, help="detail px (guidance: / 4)")
    ap.add_argument("--preset", default="flux-dev", help="tiny: a CPU dry run of the script")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.preset == "tiny":
        flux_step.DEV = "cpu"
    cfg = PRESETS[args.preset]
    model = flux_step.build(lambda: Flux(cfg))
    train.load_transformer = lambda a, device, dtype: model  # random weights, no file
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        fake_cache(common(root, args.size) + ["--out", str(root)], cfg, args.size)
        for checkpointing in (True, False):
            runs.append(one_run(model, root, args.size, args.steps, checkpointing))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "losses"}), flush=True)
    tokens = (args.size // 16) ** 2
    result = dict(
        device=torch.cuda.get_device_name() if flux_step.DEV == "cuda" else "cpu",
        torch=torch.__version__,
        date=str(date.today()),
        command="python bench/train_step.py " + " ".join(sys.argv[1:]),
        setup=f"{args.preset} random bf16 weights; detail {args.size} px ({tokens} tokens), "
        f"guidance {args.size // 4} px ({tokens // 16} tokens), {cfg.t5_length} text tokens; "
        "batch 1; routed guidance LoRA rank 16, alpha 16; AdamW; bf16 autocast",
        runs=runs,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
