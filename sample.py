"""Ultra-high-resolution images from FLUX.1 with UltraGen's hierarchical attention.

    python sample.py flux --model FLUX.1-dev/ --prompt "a red fox in snow" --levels 1024,4096
    python sample.py flux --demo          # tiny random models: checks the pipeline, no weights

prompt -> CLIP-L (pooled) and T5 (states)
  level 1 (plain FLUX, dense attention): noise -> Euler over the BFL schedule -> latent
  level 2.. (UltraGen): warm start: previous latent upsampled, sharpened, noised to t0 =
            the schedule's t at step `skip`; the first `skip` steps are skipped.
            Joint sequence [text | guidance | detail]: guidance = the previous latent
            packed (renoised to t, or clean at t = 0), at RoPE positions scaled by the
            ratio; detail attends its window + a halo + the guidance; RoPE NTK factor;
            no dynamic shift.
-> tiled VAE decode -> PNG (prompt, seed and every setting in a tEXt `parameters` JSON)

Each level's result is the guidance of the next. The time convention and the small
math live in models/sampling.py. Subcommands: `flux` (Wan comes later).
"""

import argparse
import gc
import json
import math
import secrets
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from attention import MaskRule, Plan
from models import sampling
from models.flux import from_layout, image_ids, layout_ids, pack, text_ids, to_layout, unpack

DEMO_WARNING = (
    "DEMO: tiny models with random weights (seeded). This image checks that the pipeline "
    "runs end to end; it is not a picture."
)
PAPER_SKIP = (10, 28)  # UltraGen skips 10 of 28 steps (supplement, Table 4)
DEFAULT_PROMPT = "a photograph of a red fox in fresh snow, morning light"


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def die(msg: str, code: int = 2):
    note(f"sample.py: error: {msg}")
    raise SystemExit(code)


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'1024' or 'WIDTHxHEIGHT' -> (H, W) px."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"a size is N or WIDTHxHEIGHT, got {text!r}")
    w, h = (int(parts[0]), int(parts[-1]))
    try:
        return sampling.check_size((h, w))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_levels(text: str) -> list[tuple[int, int]]:
    return [parse_size(p) for p in text.split(",") if p.strip()]


def parse_window(text: str) -> tuple[int, int]:
    """'16' or 'HxW' tokens."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a window is N or HxW tokens, got {text!r}")
    return int(parts[0]), int(parts[-1])


def parse_ratio(text: str):
    if text == "auto":
        return "auto"
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"ratio is a positive integer or 'auto', got {text!r}")
    return int(text)


def parse_shift_arg(text: str):
    try:
        return sampling.parse_shift(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_lora(text: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE' (a Windows drive letter is not taken for a scale)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not scale.startswith(("\\", "/")):
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


FLUX_EPILOG = """\
defaults that depend on the model (dev / schnell):
  --steps 28 / 4, --skip 10 / 1 (the paper's 10 of 28, rounded), --shift dynamic / off,
  --hi-shift 3 / off, --guidance-scale 3.5 / ignored, T5 length 512 / 256.

stages:
  level 1 is plain FLUX at the first size (dense attention, NTK 1, --shift).
  Every further level runs UltraGen: window-first local attention + the previous level's
  latent as guidance tokens, NTK factor --ntk, schedule --hi-shift, warm start skipping
  --skip of --steps steps. --levels 1024,4096,8192 recurses: each result guides the next.

  With --ratio 4, 8192 is guided by the 4096 result shrunk to 2048 (and warm-started
  from it whole); --ratio auto takes each level's size / the previous one's instead.

memory:
  Before sampling, the peak device memory of each level is estimated: the weights on
  the device + one transformer step at the level's token count (24 hidden widths per
  token in the model dtype; 21.1 measured on an H100) + one VAE decoder tile + the
  image. The run stops when that exceeds torch.cuda.mem_get_info's free memory plus
  what this process holds. On CPU the check is skipped unless --memory-limit is given.
  flux-dev bf16, 1024 -> 4096: estimated 33.0 GiB, measured peak 30.9 GiB (H100).

examples:
  python sample.py flux --model FLUX.1-dev/ --prompt "a lighthouse at dusk" --seed 1
  python sample.py flux --model FLUX.1-dev/ --levels 1024,4096,8192 --guidance-lora g.safetensors
  python sample.py flux --transformer flux1-dev.safetensors --ae ae.safetensors \\
      --clip clip_l.safetensors --t5 t5xxl_fp16.safetensors --tokenizers FLUX.1-dev/
  python sample.py flux --demo --out demo.png
"""


def add_flux_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model files (a snapshot folder, or the parts one by one)")
    g.add_argument("--model", metavar="DIR", help="FLUX.1 snapshot folder (Hugging Face layout)")
    g.add_argument(
        "--transformer", metavar="PATH", help="transformer file or folder (overrides --model's)"
    )
    g.add_argument("--ae", metavar="PATH", help="autoencoder file or folder")
    g.add_argument("--clip", metavar="PATH", help="CLIP-L text encoder file or folder")
    g.add_argument("--t5", metavar="PATH", help="T5-XXL encoder file or folder")
    g.add_argument("--tokenizers", metavar="DIR", help="folder with tokenizer/ and tokenizer_2/")
    g.add_argument(
        "--demo",
        action="store_true",
        help="no weights: tiny models with random weights (seeded); checks the pipeline, "
        "the image is not a picture",
    )

    g = p.add_argument_group("prompt and output")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"(default: {DEFAULT_PROMPT!r})")
    g.add_argument(
        "--seed", type=int, metavar="N", help="noise seed (default: random, recorded in the PNG)"
    )
    g.add_argument(
        "--out",
        metavar="PNG",
        help="output PNG (default: flux-SEED-WxH.png, demo-SEED-WxH.png with --demo); an "
        "existing file is never overwritten without --force",
    )
    g.add_argument("--force", action="store_true", help="overwrite an existing output file")

    g = p.add_argument_group("levels and schedules")
    g.add_argument(
        "--levels",
        type=parse_levels,
        metavar="SIZES",
        help="comma-separated sizes N or WIDTHxHEIGHT, multiples of 16 px; the first is "
        "plain FLUX, each next one UltraGen guided by the one before (default: 1024,4096; "
        "128,512 with --demo)",
    )
    g.add_argument("--steps", type=int, metavar="N", help="schedule length of every level (28 / 4)")
    g.add_argument(
        "--base-steps", type=int, metavar="N", help="steps of level 1 (default: --steps)"
    )
    g.add_argument(
        "--skip",
        type=int,
        metavar="K",
        help="warm start: steps skipped at levels 2.. (t0 = the schedule's t at this step; "
        "default round(steps * 10 / 28): 10 of 28)",
    )
    g.add_argument(
        "--guidance-scale",
        type=float,
        default=3.5,
        metavar="G",
        help="FLUX.1-dev distilled guidance; schnell has none (default: 3.5)",
    )
    g.add_argument(
        "--shift",
        type=parse_shift_arg,
        metavar="{dynamic,off,S}",
        help="level-1 time shift: dynamic (BFL, mu from the token count), off, or a static "
        "shift s (default: dynamic for dev, off for schnell)",
    )
    g.add_argument(
        "--hi-shift",
        type=parse_shift_arg,
        metavar="{off,dynamic,S}",
        help="time shift at levels 2..: the paper disables the dynamic shift, which in "
        "diffusers leaves FLUX.1-dev's static shift 3; off = no shift at all "
        "(default: 3 for dev, off for schnell)",
    )

    g = p.add_argument_group("hierarchical attention (levels 2..)")
    g.add_argument(
        "--window",
        type=parse_window,
        default=(16, 16),
        metavar="TOKENS",
        help="detail window in tokens, N or HxW; 16 tokens = 256 px (default: 16)",
    )
    g.add_argument(
        "--ratio",
        type=parse_ratio,
        default=4,
        metavar="{N,auto}",
        help="guidance grid = token grid / ratio; the previous level's latent is resized to "
        "it when sizes differ; 'auto': each level's size / the previous one's (default: 4)",
    )
    g.add_argument(
        "--scope",
        choices=("all", "aligned"),
        default="aligned",
        help="guidance seen by detail tokens: the aligned guidance window and those within "
        "--margin windows, or all of it (cost grows with the square of the pixels; "
        "default: aligned)",
    )
    g.add_argument(
        "--margin", type=int, default=1, metavar="M", help="aligned scope margin (default: 1)"
    )
    g.add_argument(
        "--neighbours",
        choices=("halo", "none", "shift"),
        default="halo",
        help="cross-window attention: halo (keys within --halo tokens), none, or shift "
        "(Swin: odd layers use windows shifted by half) (default: halo)",
    )
    g.add_argument(
        "--halo", type=int, default=1, metavar="K", help="halo width in tokens (default: 1)"
    )
    g.add_argument(
        "--guidance-mode",
        choices=("renoise", "clean"),
        default="renoise",
        help="renoise: the guidance latent noised to the current t (joint denoising, as "
        "the paper's loss); clean: kept clean with its own timestep 0 (default: renoise)",
    )
    g.add_argument(
        "--guidance-sees-text",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="guidance tokens attend to text (default: yes)",
    )
    g.add_argument(
        "--detail-sees-text",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="detail tokens attend to text (default: yes)",
    )
    g.add_argument(
        "--centre",
        action="store_true",
        help="guidance RoPE positions at the centre of the region they cover, "
        "+ (ratio - 1) / 2 (default: the paper's plain scaled positions)",
    )
    g.add_argument(
        "--ntk",
        type=float,
        default=10.0,
        metavar="F",
        help="RoPE NTK factor at levels 2.. (default: 10)",
    )
    g.add_argument(
        "--backend",
        choices=("auto", "flex", "reference", "dense"),
        default="auto",
        help="attention executor: flex (block-sparse, compiled), reference (dense masked "
        "softmax, small sizes), dense (no mask: a baseline, not UltraGen); auto: flex on "
        "CUDA, reference on CPU up to 6144 tokens (default: auto)",
    )

    g = p.add_argument_group("warm start (levels 2..)")
    g.add_argument(
        "--warm-space",
        choices=("latent", "pixel"),
        default="latent",
        help="upsample and sharpen the latent, or decode, upsample and sharpen the image "
        "and encode it again (tiled) (default: latent)",
    )
    g.add_argument(
        "--upsample",
        choices=("bicubic", "bilinear", "nearest"),
        default="bicubic",
        help="upsampling filter (default: bicubic)",
    )
    g.add_argument(
        "--sharpen",
        type=float,
        default=0.5,
        metavar="AMOUNT",
        help="unsharp mask amount: x + amount (x - blur(x)); 0 = off (default: 0.5)",
    )
    g.add_argument(
        "--sharpen-sigma",
        type=float,
        default=1.0,
        metavar="PX",
        help="Gaussian blur sigma of the unsharp mask, in pixels of the lower level "
        "(latent or image pixels per --warm-space) (default: 1)",
    )

    g = p.add_argument_group("LoRA")
    g.add_argument(
        "--guidance-lora",
        metavar="PATH",
        help="UltraGen's trained guidance LoRA (save_lora file): q, k, v of the image "
        "stream, routed to the guidance tokens only",
    )
    g.add_argument(
        "--lora",
        type=parse_lora,
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="community FLUX LoRA (diffusers, kohya or XLabs) merged into the weights at "
        "SCALE (default 1); repeat for several",
    )

    g = p.add_argument_group("runtime")
    g.add_argument(
        "--device", metavar="DEV", help="cuda, cuda:1, cpu (default: cuda when available)"
    )
    g.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="model dtype (default: auto = bf16 on CUDA, fp32 on CPU)",
    )
    g.add_argument(
        "--vae-tile",
        type=int,
        default=64,
        metavar="N",
        help="VAE decode tile in latent pixels (64 = 512 px) (default: 64)",
    )
    g.add_argument(
        "--vae-overlap",
        type=int,
        default=16,
        metavar="N",
        help="VAE tile overlap, latent px (default: 16)",
    )
    g.add_argument(
        "--memory-limit",
        type=float,
        metavar="GIB",
        help="plan as if the device had GIB for this process (also checks on CPU)",
    )
    g.add_argument(
        "--no-memory-check", action="store_true", help="skip the memory estimate and run anyway"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py",
        description="Ultra-high-resolution images with hierarchical attention (UltraGen).",
    )
    sub = parser.add_subparsers(dest="family", required=True, metavar="{flux}")
    flux = sub.add_parser(
        "flux",
        help="FLUX.1-dev / schnell + UltraGen (image)",
        description=__doc__.split("\n\n")[2],
        epilog=FLUX_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flux_arguments(flux)
    return parser


# ---------------------------------------------------------------------------------------
# settings: the arguments resolved against the model
# ---------------------------------------------------------------------------------------


def resolve_defaults(args, variant: str) -> None:
    """Fills the model-dependent defaults in args (see FLUX_EPILOG)."""
    dev = variant != "flux-schnell"
    if args.steps is None:
        args.steps = 28 if dev else 4
    if args.base_steps is None:
        args.base_steps = args.steps
    if args.skip is None:
        args.skip = round(args.steps * PAPER_SKIP[0] / PAPER_SKIP[1])
    if args.shift is None:
        args.shift = "dynamic" if dev else "off"
    if args.hi_shift is None:
        args.hi_shift = 3.0 if dev else "off"
    if not dev:
        args.guidance_scale = None
    if args.base_steps < 1:
        die(f"--base-steps must be >= 1, got {args.base_steps}")
    try:
        sampling.check_skip(args.steps, args.skip)
    except ValueError as e:
        die(f"--skip: {e}")


def level_ratios(args) -> list[int]:
    """The guidance ratio of each level after the first."""
    levels = args.levels
    if args.ratio != "auto":
        return [args.ratio] * (len(levels) - 1)
    try:
        return [sampling.level_ratio(s, p) for p, s in zip(levels, levels[1:])]
    except ValueError as e:
        die(f"--ratio auto: {e}")


def mask_rule(args) -> MaskRule:
    return MaskRule(
        scope=args.scope,
        margin=args.margin,
        neighbours=args.neighbours,
        halo=args.halo,
        guidance_sees_text=args.guidance_sees_text,
        detail_sees_text=args.detail_sees_text,
    )


def pick_backend(name: str, device: torch.device, n_tokens: int) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "flex"
    return "reference" if n_tokens <= 6144 else "flex"


def default_out(args) -> Path:
    h, w = args.levels[-1]
    return Path(f"{'demo' if args.demo else 'flux'}-{args.seed}-{w}x{h}.png")


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------


def demo_tokenizers(t5_length: int):
    """Tokenizers built in memory for the tiny text encoders (vocab 1000): CLIP over the
    256 byte-level symbols (no merges), T5 over printable ASCII characters."""
    import string

    from tokenizers import pre_tokenizers

    from models.tokenizers import CLIPTokenizer, T5Tokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id: CLIP pools at argmax(ids)
    clip = CLIPTokenizer(vocab, [], max_length=77)
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    t5 = T5Tokenizer(pieces, unk_id=2, max_length=t5_length, extra_ids=0)
    return clip, t5


def demo_models(device, dtype, weight_seed: int = 0):
    """FluxModels of the tiny presets with random weights drawn from weight_seed (the
    sampling seed only changes the noise)."""
    from models import autoencoder, clip, flux, t5
    from models.flux_files import FluxModels

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weight_seed)
        cfg = flux.PRESETS["tiny"]
        m = FluxModels(
            variant="flux-dev",  # the tiny preset has the guidance embedding
            transformer=flux.Flux(cfg),
            ae=autoencoder.AutoEncoder(autoencoder.PRESETS["tiny"]),
            clip=clip.CLIPTextEncoder(clip.PRESETS["tiny"]),
            t5=t5.T5Encoder(t5.PRESETS["tiny"]),
        )
    m.clip_tokenizer, m.t5_tokenizer = demo_tokenizers(cfg.t5_length)
    for part in ("transformer", "ae", "clip", "t5"):
        setattr(m, part, getattr(m, part).to(device=device, dtype=dtype).eval())
    return m


def load_models(args, device, dtype):
    from models.flux_files import load_flux
    from models.loading import CheckpointError

    files = dict(transformer=args.transformer, ae=args.ae, clip=args.clip, t5=args.t5)
    if args.model is None and not all(files.values()):
        die(
            "no weights: pass --model SNAPSHOT_FOLDER, or --transformer --ae --clip --t5 "
            "--tokenizers, or --demo for tiny random models"
        )
    try:
        m = load_flux(args.model, **files, tokenizers=args.tokenizers, device=device, dtype=dtype)
    except CheckpointError as e:
        die(str(e))
    for part in ("transformer", "ae", "clip", "t5"):
        getattr(m, part).eval()
    return m


def add_loras(transformer, args) -> None:
    """Community LoRAs merged first (into base weights, every token), then the routed
    guidance LoRA (its own A, B on the guidance tokens only)."""
    if not args.lora and not args.guidance_lora:
        return
    try:
        from models import lora
    except ImportError as e:
        die(f"--lora / --guidance-lora need models/lora.py: {e}")
    for path, scale in args.lora:
        names = lora.apply_lora(transformer, path, scale)
        note(f"lora      {path} at scale {scale:g}: {len(names)} weights changed")
    if args.guidance_lora:
        names = lora.load_lora(transformer, args.guidance_lora)
        note(f"guidance  LoRA {args.guidance_lora}: {len(names)} routed layers")


def weight_bytes(*modules) -> int:
    return sum(
        t.numel() * t.element_size()
        for m in modules
        if m is not None
        for t in [*m.parameters(), *m.buffers()]
    )


# ---------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------


@dataclass
class Cond:
    txt: torch.Tensor  # (B, L_txt, context_in_dim) T5 states
    y: torch.Tensor  # (B, vec_in_dim) CLIP pooled
    guidance: torch.Tensor | None  # (B,) distilled guidance scale (dev), None (schnell)

    @property
    def n_text(self) -> int:
        return self.txt.shape[1]


def encode_prompt(models, prompt: str, device, dtype, guidance_scale) -> Cond:
    clip_ids = models.clip_tokenizer(prompt).to(device)  # (1, 77)
    t5_ids = models.t5_tokenizer(prompt).to(device)  # (1, L_txt)
    y = models.clip(clip_ids).to(dtype)  # (1, vec_in_dim)
    txt = models.t5(t5_ids).to(dtype)  # (1, L_txt, context_in_dim)
    g = None if guidance_scale is None else torch.full((1,), guidance_scale, device=device)
    return Cond(txt, y, g)


# ---------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------


class Progress:
    """One stderr line per level, rewritten after every step: rate and ETA."""

    def __init__(self, label: str, total: int, device):
        self.label, self.total, self.device = label, total, device
        self.start = time.perf_counter()
        self.done = 0

    def step(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest step times
        self.done += 1
        elapsed = time.perf_counter() - self.start
        per = elapsed / self.done
        rate = f"{1 / per:.2f} it/s" if per < 1 else f"{per:.2f} s/it"
        eta = _clock((self.total - self.done) * per)
        end = "\n" if self.done == self.total else ""
        line = f"\r{self.label}  step {self.done}/{self.total}  {rate}  ETA {eta}"
        if end:
            line = f"\r{self.label}  {self.total} steps in {_clock(elapsed)}  {rate}   "
        sys.stderr.write(line + end)
        sys.stderr.flush()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------


def velocity(model, img, img_ids, txt_ids, cond: Cond, t: float, **kw) -> torch.Tensor:
    """The model's velocity for tokens img (B, L, 64) at time t, in fp32."""
    dtype = cond.txt.dtype
    B = img.shape[0]
    tt = torch.full((B,), t, device=img.device)
    out = model(img.to(dtype), img_ids, cond.txt, txt_ids, tt, cond.y, cond.guidance, **kw)
    return out.float()


def base_level(model, cond: Cond, size, args, noise_gen, label):
    """Level 1, plain FLUX: noise -> (latent (B, 16, H/8, W/8) fp32, info)."""
    device = cond.txt.device
    lh, lw = sampling.latent_size(size)
    noise = torch.randn(1, 16, lh, lw, generator=noise_gen).to(device)  # (B, 16, lh, lw)
    x = pack(noise)  # (B, lh/2 · lw/2, 64)
    img_ids = image_ids(lh // 2, lw // 2, 1, device)
    txt_ids = text_ids(cond.n_text, 1, device)
    ts = sampling.schedule(args.base_steps, args.shift, n_tokens=x.shape[1])
    progress = Progress(label, args.base_steps, device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(model, x, img_ids, txt_ids, cond, t, ntk_factor=1.0)
        x = sampling.euler_step(x, v, t, t_next)
        progress.step()
    return unpack(x, lh, lw), dict(steps=args.base_steps, seconds=round(progress.seconds, 2))


def warm_source(prev: torch.Tensor, size, args, ae) -> torch.Tensor:
    """The sharpened upsample of the previous level, as a latent of the target size."""
    lat = sampling.latent_size(size)
    kw = dict(mode=args.upsample, amount=args.sharpen, sigma=args.sharpen_sigma)
    if args.warm_space == "latent":
        return sampling.sharpened_upsample(prev, lat, **kw)
    ae_dtype = next(ae.parameters()).dtype
    tile = dict(tile=args.vae_tile, overlap=args.vae_overlap)
    image = ae.decode_tiled(prev.to(ae_dtype), **tile).float()  # (B, 3, h, w)
    image = sampling.sharpened_upsample(image, size, **kw).clamp(-1, 1)
    return ae.encode_tiled(image.to(ae_dtype), **tile).float()  # (B, 16, H/8, W/8)


def hierarchical_level(
    model, ae, cond: Cond, prev: torch.Tensor, size, ratio: int, args, noise_gen, label
):
    """One UltraGen level: prev (B, 16, h, w) guides a (B, 16, H/8, W/8) latent.
    -> (latent fp32, info)."""
    device = cond.txt.device
    layout = sampling.hierarchical_layout(size, cond.n_text, args.window, ratio, args.centre)
    backend = pick_backend(args.backend, device, layout.n)
    plan = Plan(layout, mask_rule(args), backend=backend)

    # guidance: the previous latent on the guidance grid, packed (B, Lg, 64)
    hg, wg = layout.guidance_grid[1:]
    if tuple(prev.shape[-2:]) != (2 * hg, 2 * wg):
        ph, pw = (8 * n for n in prev.shape[-2:])
        note(f"guidance  the {pw}x{ph} result resized to {16 * wg}x{16 * hg} for ratio {ratio}")
    g0 = pack(sampling.resize(prev, (2 * hg, 2 * wg), args.upsample))  # (B, Lg, 64)

    # warm start at t0 = the schedule's t at step `skip`
    lh, lw = sampling.latent_size(size)
    ts = sampling.schedule(args.steps, args.hi_shift, n_tokens=layout.n_detail)
    t0 = ts[args.skip]
    eps = torch.randn(1, 16, lh, lw, generator=noise_gen).to(device)
    # renoise: one eps_g for every step, so the guidance moves along its own straight
    # path (1 - t) g0 + t eps_g, as in training
    eps_g = torch.randn(g0.shape, generator=noise_gen).to(device)
    x = pack(sampling.warm_start(warm_source(prev, size, args, ae), eps, t0))  # (B, Ld, 64)

    txt_ids, img_ids = layout_ids(layout, 1, device)
    clean = args.guidance_mode == "clean"
    g_t = torch.zeros(1, device=device) if clean else None
    run = ts[args.skip :]
    progress = Progress(label, len(run) - 1, device)
    for t, t_next in zip(run[:-1], run[1:]):
        g = g0 if clean else sampling.noised(g0, eps_g, t)  # (B, Lg, 64)
        img = to_layout(layout, x, g)  # (B, Lg + Ld, 64), layout order
        v = velocity(
            model,
            img,
            img_ids,
            txt_ids,
            cond,
            t,
            plan=plan,
            ntk_factor=args.ntk,
            n_guidance=layout.n_guidance,
            guidance_timesteps=g_t,
        )
        v_detail, _ = from_layout(layout, v)  # (B, Ld, 64) raster
        x = sampling.euler_step(x, v_detail, t, t_next)
        progress.step()
    info = dict(
        layout=layout.describe(),
        backend=backend,
        ratio=ratio,
        t0=round(t0, 6),
        steps=len(run) - 1,
        seconds=round(progress.seconds, 2),
    )
    return unpack(x, lh, lw), info


# ---------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------


def check_memory(args, models, n_text: int, ratios, device, dtype) -> None:
    """Stops before sampling when the largest level will not fit (see FLUX_EPILOG)."""
    if args.no_memory_check:
        note("memory    check skipped (--no-memory-check)")
        return
    if args.memory_limit is not None:
        available, where = int(args.memory_limit * (1 << 30)), "--memory-limit"
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        available, where = free + torch.cuda.memory_reserved(device), "mem_get_info"
    else:
        note("memory    check skipped on CPU (give --memory-limit to check anyway)")
        return
    weights = weight_bytes(models.transformer, models.ae)
    hidden = models.transformer.config.hidden_size
    vae_scale = models.ae.config.ch / 128
    worst, worst_size = None, None
    for i, size in enumerate(args.levels):
        if i == 0:
            n = n_text + math.prod(sampling.token_grid(size))
        else:
            lay = sampling.hierarchical_layout(size, n_text, args.window, ratios[i - 1])
            n = lay.n
        est = sampling.estimate_memory(
            weights=weights,
            n_tokens=n,
            hidden=hidden,
            dtype_bytes=torch.finfo(dtype).bits // 8,
            image=size,
            vae_tile=args.vae_tile,
            vae_scale=vae_scale,
        )
        if worst is None or est.total > worst.total:
            worst, worst_size = est, size
    h, w = worst_size
    problem = sampling.memory_problem(worst, available, f"level {w}x{h} ")
    if problem:
        die(
            f"will not fit in device memory: {problem} ({where}). Try smaller --levels, "
            "--dtype bf16, or --no-memory-check to try anyway."
        )
    note(f"memory    peak about {worst.describe()}; {available / (1 << 30):.1f} GiB available")


# ---------------------------------------------------------------------------------------
# PNG: RGB, 8 bit, tEXt chunks (stdlib only)
# ---------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(rgb: torch.Tensor, text: dict[str, str]) -> bytes:
    """(H, W, 3) uint8 -> a PNG with one tEXt chunk per entry of text (Latin-1)."""
    h, w, c = rgb.shape
    if c != 3 or rgb.dtype != torch.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {tuple(rgb.shape)} {rgb.dtype}")
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), rgb.reshape(h, w * 3).cpu()], 1)
    data = zlib.compress(rows.numpy().tobytes(), 6)  # filter 0 (none) on every row
    out = [PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    for key, value in text.items():
        out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
    step = 1 << 24
    out += [_chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step)]
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def read_png(data: bytes) -> dict:
    """The width, height and tEXt entries of a PNG (CRCs checked)."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG: bad signature")
    pos, info = 8, {"text": {}}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"bad CRC in a {kind!r} chunk")
        if kind == b"IHDR":
            info["width"], info["height"], info["bit_depth"], info["color_type"] = struct.unpack(
                ">IIBB", body[:10]
            )
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            info["text"][key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + n
    return info


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8, on the CPU."""
    x = ((image[0].cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous()


def write_png(path: Path, rgb: torch.Tensor, text: dict, force: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(rgb, text)
    try:
        with open(path, "wb" if force else "xb") as f:
            f.write(data)
    except FileExistsError:
        die(f"{path} exists (written while sampling?); not overwritten without --force")


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------


def jsonable(args) -> dict:
    """The settings as JSON values: sizes as "WxH", paths as strings."""
    out = {}
    for k, v in vars(args).items():
        if k == "levels":
            v = [f"{w}x{h}" for h, w in v]
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, list):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        out[k] = v
    return out


def run_flux(args) -> int:
    # everything that can be refused is refused before any model is loaded
    if args.demo and any([args.model, args.transformer, args.ae, args.clip, args.t5]):
        die("--demo builds its own tiny models: drop --model / --transformer / ...")
    if args.levels is None:
        args.levels = parse_levels("128,512" if args.demo else "1024,4096")
    if not args.levels:
        die("--levels is empty")
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    args.out = Path(args.out) if args.out else default_out(args)
    if args.out.exists() and not args.force:
        die(f"{args.out} exists; not overwritten (pass --force, or another --out)")
    for path in [args.guidance_lora] + [p for p, _ in args.lora]:
        if path and not Path(path).exists():
            die(f"LoRA file {path} not found")
    if args.steps is not None and args.skip is not None:
        try:
            sampling.check_skip(args.steps, args.skip)
        except ValueError as e:
            die(f"--skip: {e}")
    ratios = level_ratios(args)
    for size, ratio in zip(args.levels[1:], ratios):
        try:
            sampling.hierarchical_layout(size, 0, args.window, ratio)
        except ValueError as e:
            die(f"level {size[1]}x{size[0]}: {e}")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)
    dtype = dtypes.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.device, args.dtype = str(device), {v: k for k, v in dtypes.items()}[dtype]
    if args.demo:
        note(DEMO_WARNING)
    started = time.perf_counter()
    models = demo_models(device, dtype) if args.demo else load_models(args, device, dtype)
    resolve_defaults(args, models.variant)
    add_loras(models.transformer, args)
    note(f"model     {models.variant}{' (tiny demo)' if args.demo else ''} on {device}, {dtype}")

    with torch.inference_mode():
        cond = encode_prompt(models, args.prompt, device, dtype, args.guidance_scale)
        models.clip = models.t5 = None  # the text encoders are done: free their memory
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        check_memory(args, models, cond.n_text, ratios, device, dtype)
        if len(args.levels) > 1 and not args.guidance_lora:
            note("note      no --guidance-lora: guidance tokens use the base weights")

        noise_gen = torch.Generator().manual_seed(args.seed)  # CPU: the same on any device
        levels, n = [], len(args.levels)
        h, w = args.levels[0]
        latent, info = base_level(
            models.transformer, cond, (h, w), args, noise_gen, f"level 1/{n} {w}x{h} flux"
        )
        levels.append(dict(size=[w, h], **info))
        for i, (size, ratio) in enumerate(zip(args.levels[1:], ratios), start=2):
            h, w = size
            label = f"level {i}/{n} {w}x{h} ultragen"
            latent, info = hierarchical_level(
                models.transformer, models.ae, cond, latent, size, ratio, args, noise_gen, label
            )
            levels.append(dict(size=[w, h], **info))

        t = time.perf_counter()
        ae_dtype = next(models.ae.parameters()).dtype
        tile = dict(tile=args.vae_tile, overlap=args.vae_overlap)
        image = models.ae.decode_tiled(latent.to(ae_dtype), **tile)  # (1, 3, H, W)
        note(f"decode    {w}x{h} in {time.perf_counter() - t:.1f} s")

    meta = dict(
        prompt=args.prompt,
        seed=args.seed,
        model=models.variant,
        demo=args.demo,
        levels=levels,
        settings=jsonable(args),
        software="ultrares sample.py",
        torch=torch.__version__,
        seconds=round(time.perf_counter() - started, 2),
    )
    if args.demo:
        meta["warning"] = DEMO_WARNING
    text = {"parameters": json.dumps(meta, ensure_ascii=True), "Software": "ultrares sample.py"}
    if args.demo:
        text["Warning"] = DEMO_WARNING
    write_png(args.out, to_rgb(image), text, args.force)
    note(f"wrote     {args.out} ({w}x{h}, seed {args.seed})")
    if args.demo:
        note(DEMO_WARNING)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.family == "flux":
        return run_flux(args)
    raise AssertionError(args.family)


if __name__ == "__main__":
    sys.exit(main())
