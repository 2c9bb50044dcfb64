"""Ultra-high-resolution images and videos: the sampler's command line.

    python sample.py flux --model FLUX.1-dev/ --prompt "a red fox in snow" --levels 1024,4096
    python sample.py wan --model Wan2.1-T2V-1.3B/ --prompt "a red fox running in snow"
    python sample.py flux --demo     # tiny random models: checks the pipeline, no weights
    python sample.py wan --demo

This file is the command line only: arguments, checks that refuse bad input before any
model loads, files (PNG, MP4), progress, the memory check, --demo. Each method's
procedure is one module, readable top to bottom in run order:
    flux   UltraGen (image) on FLUX.1       models/ultragen_image.py
    wan    plain Wan2.1 text-to-video        models/wan_t2v.py
"""

import argparse
import gc
import json
import secrets
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from models import arguments as A
from models import demo, media, sampling, ultragen_image, video_file, wan, wan_t2v
from models.progress import Progress

DEFAULT_PROMPT = "a photograph of a red fox in fresh snow, morning light"
DEFAULT_VIDEO_PROMPT = "a red fox trotting through fresh snow, morning light, tracking shot"
OUTPUTS = Path("outputs")  # where outputs go without --out (ignored by git)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def die(msg: str, code: int = 2):
    note(f"sample.py: error: {msg}")
    raise SystemExit(code)


class Parser(argparse.ArgumentParser):
    """Bad arguments are one line (not the whole usage) and exit code 2."""

    def error(self, message):
        die(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------

FLUX_EPILOG = """\
defaults that depend on the model (dev / schnell):
  --steps 28 / 4, --skip 10 / 1 (the paper's 10 of 28, rounded), --shift dynamic / off,
  --hi-shift 3 / off, --guidance-scale 3.5 / ignored, T5 length 512 / 256.

stages (models/ultragen_image.py):
  level 1 is plain FLUX at the first size (dense attention, NTK 1, --shift). Every further
  level runs UltraGen: window-first local attention + the previous level's latent as
  guidance tokens, NTK --ntk, schedule --hi-shift, warm start skipping --skip of --steps
  steps. --levels 1024,4096,8192 recurses: each result guides the next. With --ratio 4,
  8192 is guided by the 4096 result shrunk to 2048; --ratio auto takes size / previous.

memory: the peak of each level is estimated (weights + one step at its token count + an AE
  tile + the image) and the run stops early when it will not fit (flux-dev bf16, 1024 ->
  4096: 33.0 GiB estimated, 30.9 measured on an H100). CPU: only with --memory-limit.

examples:
  python sample.py flux --model FLUX.1-dev/ --prompt "a lighthouse at dusk" --seed 1
  python sample.py flux --model FLUX.1-dev/ --levels 1024,4096,8192 --guidance-lora g.safetensors
  python sample.py flux --transformer flux1-dev.safetensors --ae ae.safetensors \\
      --clip clip_l.safetensors --t5 t5xxl_fp16.safetensors --tokenizers FLUX.1-dev/
"""

WAN_EPILOG = """\
the procedure (models/wan_t2v.py), as the official Wan2.1 code runs it:
  umT5 encodes the prompt and the negative prompt (512 tokens; a longer prompt is cut);
  noise is denoised over --steps steps of the flow-matching schedule with --shift, with
  classifier-free guidance --cfg (two forwards per step; --cfg 1 = one), by UniPC (the
  official solver; official settings reproduce official output) or Euler (what UltraGen
  video and AtlasVid use); the VAE decodes in spatial tiles, each tile over all frames.

sizes: 832x480 (or 480x832) is the only size the official code accepts for 1.3B (720p
  runs, less stably: allowed, with a warning); 14B takes 480p and 1280x720 (its default).
  The Wan README suggests --cfg 6 and --shift 8 to 12 for 1.3B at 480p; the defaults here
  are the official command line's (cfg 5, shift 5).

memory: umT5 is loaded, used and freed first; the transformer is freed before the VAE
  decodes. The sampling phase's peak is estimated and the run stops early if it won't fit.

examples:
  python sample.py wan --model Wan2.1-T2V-1.3B/ --prompt "a koi pond in the rain" --seed 3
  python sample.py wan --model Wan2.1-T2V-14B/ --size 1280x720 --frames 81 --out koi.mp4
  python sample.py wan --transformer wan2.1_t2v_1.3B_bf16.safetensors \\
      --vae wan_2.1_vae.safetensors --umt5 umt5_xxl_fp16.safetensors \\
      --tokenizer Wan2.1-T2V-1.3B/google/umt5-xxl
"""


# the argument tables read better one option per line:
# fmt: off
def add_common(p, what: str, suffix: str) -> None:
    g = p.add_argument_group("output and runtime")
    g.add_argument("--seed", type=A.parse_seed, metavar="N",
                   help=f"noise seed, 0..2^63-1 (default: random, recorded in the {what})")
    g.add_argument("--out", metavar=suffix.upper()[1:],
                   help=f"output {suffix} file; its folder must exist (default: "
                   f"{OUTPUTS}/NAME-SEED-WxH{suffix}); never overwritten without --force")
    g.add_argument("--force", action="store_true", help="overwrite an existing output file")
    g.add_argument("--device", metavar="DEV", help="cuda, cuda:1, cpu (default: cuda if any)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="model dtype (default: auto = bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--memory-limit", type=float, metavar="GIB",
                   help="plan as if the device had GIB for this process (also checks on CPU)")
    g.add_argument("--no-memory-check", action="store_true",
                   help="skip the memory estimate and run anyway")


def add_flux_arguments(p) -> None:
    g = p.add_argument_group("model files (a snapshot folder, or the parts one by one)")
    g.add_argument("--model", metavar="DIR", help="FLUX.1 snapshot folder (Hugging Face layout)")
    g.add_argument("--transformer", metavar="PATH", help="transformer file or folder")
    g.add_argument("--ae", metavar="PATH", help="autoencoder file or folder")
    g.add_argument("--clip", metavar="PATH", help="CLIP-L text encoder file or folder")
    g.add_argument("--t5", metavar="PATH", help="T5-XXL encoder file or folder")
    g.add_argument("--tokenizers", metavar="DIR", help="folder with tokenizer/ and tokenizer_2/")
    g.add_argument("--demo", action="store_true", help="no weights: tiny models with random "
                   "weights (seeded); checks the pipeline, the image is not a picture")

    g = p.add_argument_group("prompt and levels")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"(default: {DEFAULT_PROMPT!r})")
    g.add_argument("--levels", type=A.parse_levels, metavar="SIZES",
                   help="comma-separated sizes N or WIDTHxHEIGHT, multiples of 16 px, each larger "
                   "than the one before; the first is plain FLUX, each next one UltraGen guided "
                   "by the one before (default: 1024,4096; 128,512 with --demo)")
    g.add_argument("--steps", type=A.positive_int, metavar="N",
                   help="schedule length of every level (28 / 4)")
    g.add_argument("--base-steps", type=A.positive_int, metavar="N",
                   help="steps of level 1 (default: --steps)")
    g.add_argument("--skip", type=A.non_negative_int, metavar="K",
                   help="warm start: steps skipped at levels 2.. (t0 = the schedule's t at this "
                   "step; default round(steps * 10 / 28))")
    g.add_argument("--guidance-scale", type=float, default=3.5, metavar="G",
                   help="FLUX.1-dev distilled guidance; schnell has none (default: 3.5)")
    g.add_argument("--shift", type=A.parse_shift, metavar="{dynamic,off,S}",
                   help="level-1 time shift: dynamic (BFL), off, or a static shift s "
                   "(default: dynamic for dev, off for schnell)")
    g.add_argument("--hi-shift", type=A.parse_shift, metavar="{off,dynamic,S}",
                   help="time shift at levels 2..: the paper disables the dynamic shift, which "
                   "in diffusers leaves FLUX.1-dev's static shift 3 (default: 3 dev, off schnell)")

    g = p.add_argument_group("hierarchical attention (levels 2..)")
    g.add_argument("--window", type=A.parse_window, default=(16, 16), metavar="TOKENS",
                   help="detail window in tokens, N or HxW; 16 tokens = 256 px (default: 16)")
    g.add_argument("--ratio", type=A.parse_ratio, default=4, metavar="{N,auto}",
                   help="guidance grid = token grid / ratio; 'auto': each level's size / the "
                   "previous one's (default: 4)")
    g.add_argument("--scope", choices=("all", "aligned"), default="aligned",
                   help="guidance seen by detail tokens: the aligned guidance window and those "
                   "within --margin windows, or all of it (quadratic cost) (default: aligned)")
    g.add_argument("--margin", type=A.non_negative_int, default=1, metavar="M",
                   help="aligned scope margin (default: 1)")
    g.add_argument("--neighbours", choices=("halo", "none", "shift"), default="halo",
                   help="cross-window attention: halo (keys within --halo tokens), none, or "
                   "shift (Swin: odd layers use windows shifted by half) (default: halo)")
    g.add_argument("--halo", type=A.non_negative_int, default=1, metavar="K",
                   help="halo width in tokens (default: 1)")
    g.add_argument("--guidance-mode", choices=("renoise", "clean"), default="renoise",
                   help="renoise: the guidance latent noised to the current t (joint denoising, "
                   "as the paper's loss); clean: kept clean at its own t = 0 (default: renoise)")
    g.add_argument("--guidance-sees-text", action=argparse.BooleanOptionalAction, default=True,
                   help="guidance tokens attend to text (default: yes)")
    g.add_argument("--detail-sees-text", action=argparse.BooleanOptionalAction, default=True,
                   help="detail tokens attend to text (default: yes)")
    g.add_argument("--centre", action="store_true", help="guidance RoPE positions at the "
                   "centre of the region they cover, + (ratio - 1) / 2")
    g.add_argument("--ntk", type=float, default=10.0, metavar="F",
                   help="RoPE NTK factor at levels 2.. (default: 10)")
    g.add_argument("--backend", choices=("auto", "flex", "reference", "dense"), default="auto",
                   help="attention executor: flex (block-sparse, compiled), reference (dense "
                   "masked softmax, small sizes), dense (no mask: a baseline, not UltraGen); "
                   "auto: flex on CUDA, reference on CPU up to 6144 tokens (default: auto)")

    g = p.add_argument_group("warm start (levels 2..)")
    g.add_argument("--warm-space", choices=("latent", "pixel"), default="latent",
                   help="upsample and sharpen the latent, or decode, upsample and sharpen the "
                   "image and encode it again (default: latent)")
    g.add_argument("--upsample", choices=("bicubic", "bilinear", "nearest"), default="bicubic",
                   help="upsampling filter (default: bicubic)")
    g.add_argument("--sharpen", type=float, default=0.5, metavar="AMOUNT",
                   help="unsharp mask amount: x + amount (x - blur(x)); 0 = off (default: 0.5)")
    g.add_argument("--sharpen-sigma", type=float, default=1.0, metavar="PX",
                   help="its Gaussian sigma, in pixels of the lower level (default: 1)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--guidance-lora", metavar="PATH", help="UltraGen's trained guidance LoRA "
                   "(train.py's lora.safetensors), routed to the guidance tokens only")
    g.add_argument("--lora", type=A.parse_lora, action="append", default=[],
                   metavar="PATH[:SCALE]", help="community FLUX LoRA (diffusers, kohya or "
                   "XLabs) merged into the weights at SCALE (default 1); repeat for several")
    g.add_argument("--vae-tile", type=A.positive_int, default=64, metavar="N",
                   help="AE decode tile, latent pixels (64 = 512 px) (default: 64)")
    g.add_argument("--vae-overlap", type=A.non_negative_int, default=16, metavar="N",
                   help="AE tile overlap, latent pixels (default: 16)")
    add_common(p, "PNG", ".png")


def add_wan_arguments(p) -> None:
    g = p.add_argument_group("model files (a snapshot folder, or the parts one by one)")
    g.add_argument("--model", metavar="DIR", help="Wan2.1 T2V snapshot (original or diffusers)")
    g.add_argument("--transformer", metavar="PATH", help="transformer file or folder")
    g.add_argument("--vae", metavar="PATH", help="VAE file (Wan2.1_VAE.pth, ...) or folder")
    g.add_argument("--umt5", metavar="PATH", help="umT5-XXL encoder file or folder")
    g.add_argument("--tokenizer", metavar="DIR", help="umT5 tokenizer folder (google/umt5-xxl)")
    g.add_argument("--demo", action="store_true", help="no weights: tiny Wan, VAE and umT5 with "
                   "random weights (seeded); checks the pipeline, the video is not a video")

    g = p.add_argument_group("prompt and video")
    g.add_argument("--prompt", default=DEFAULT_VIDEO_PROMPT,
                   help=f"(default: {DEFAULT_VIDEO_PROMPT!r})")
    g.add_argument("--negative-prompt", default=wan_t2v.NEGATIVE_PROMPT, metavar="TEXT",
                   help="(default: Wan's sample_neg_prompt, in Chinese)")
    g.add_argument("--size", type=A.parse_size, metavar="WxH",
                   help="multiples of 16 px (default: 832x480 for 1.3B, 1280x720 for 14B; "
                   "128x128 with --demo)")
    g.add_argument("--frames", type=A.parse_frames, metavar="N",
                   help="1 + 4k frames (default: 81; 17 with --demo)")
    g.add_argument("--fps", type=A.positive_int, default=wan_t2v.FPS,
                   help=f"frames per second of the file (default: {wan_t2v.FPS})")

    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=A.positive_int, metavar="N", help="(default: 50; 8 --demo)")
    g.add_argument("--cfg", type=A.non_negative_float, default=5.0, metavar="G",
                   help="classifier-free guidance scale; 1 = prompt only (default: 5)")
    g.add_argument("--shift", type=A.positive_float, default=5.0, metavar="S",
                   help="flow-matching time shift s t / (1 + (s - 1) t) (default: 5)")
    g.add_argument("--solver", choices=("unipc", "euler"), default="unipc",
                   help="unipc: the official multistep solver; euler (default: unipc)")
    g.add_argument("--vae-tile", type=A.positive_int, default=160, metavar="N",
                   help="largest VAE tile side, latent pixels; each tile decodes all frames, "
                   "so device memory is one tile's; 32 fits 4K in 8 GiB (default: 160)")
    g.add_argument("--vae-overlap", type=A.non_negative_int, default=8, metavar="N",
                   help="VAE tile overlap, latent pixels (default: 8)")
    add_common(p, "MP4's metadata", ".mp4")


# fmt: on


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sample.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="family", required=True, metavar="{flux,wan}")
    fmt = argparse.RawDescriptionHelpFormatter
    flux = sub.add_parser("flux", help="FLUX.1-dev / schnell + UltraGen (image)",
                          description="Ultra-high-resolution images with UltraGen's "
                          "hierarchical attention on FLUX.1.", epilog=FLUX_EPILOG,
                          formatter_class=fmt)  # fmt: skip
    add_flux_arguments(flux)
    wan = sub.add_parser("wan", help="Wan2.1 text-to-video (1.3B, 14B)",
                         description="Plain Wan2.1 text-to-video, as the official code.",
                         epilog=WAN_EPILOG, formatter_class=fmt)  # fmt: skip
    add_wan_arguments(wan)
    return parser


# ---------------------------------------------------------------------------------------
# shared steps: output, device, memory, settings as JSON
# ---------------------------------------------------------------------------------------


def check_sources(args, parts, extra: str) -> None:
    """--demo, or --model, or every part file: anything else is refused here."""
    given = [getattr(args, p) for p in parts]
    flags = " ".join(f"--{p}" for p in parts) + (f" {extra}" if extra else "")
    if args.demo and (args.model or any(given)):
        die("--demo builds its own tiny models: drop --model / --transformer / ...")
    if not args.demo and args.model is None and not all(given):
        die(f"no weights: pass --model SNAPSHOT_FOLDER, or {flags}, or --demo for tiny "
            "random models")  # fmt: skip


def reserve_output(args, name: str, suffix: str) -> media.Reservation:
    """Claims the output before anything loads (bad paths fail here, in one line): a PNG,
    or an MP4 (a folder of PNG frames without imageio-ffmpeg)."""
    if args.out is None:
        OUTPUTS.mkdir(exist_ok=True)
        args.out = OUTPUTS / f"{name}{suffix}"
    try:
        if suffix == ".mp4":
            return video_file.reserve_video(args.out, args.force)
        return media.reserve(media.check_suffix(args.out, (suffix,)), args.force)
    except media.OutputError as e:
        die(str(e))


def pick_device(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)
    dtype = dtypes.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.device, args.dtype = str(device), {v: k for k, v in dtypes.items()}[dtype]
    return device, dtype


def available_memory(args, device):
    """(bytes, where they were read) for the memory check, or None to skip it."""
    if args.no_memory_check:
        note("memory    check skipped (--no-memory-check)")
    elif args.memory_limit is not None:
        return int(args.memory_limit * (1 << 30)), "--memory-limit"
    elif device.type == "cuda":
        return sampling.device_memory(device), "mem_get_info"
    else:
        note("memory    check skipped on CPU (give --memory-limit to check anyway)")
    return None


def check_memory(args, device, estimate, what: str, hint: str) -> None:
    """Stops before sampling when the estimated peak will not fit in the device memory."""
    got = available_memory(args, device)
    if got is None:
        return
    available, where = got
    problem = sampling.memory_problem(estimate, available, what)
    if problem:
        die(f"will not fit in device memory: {problem} ({where}). Try {hint}, or "
            "--no-memory-check to try anyway.")  # fmt: skip
    note(f"memory    peak about {estimate.describe()}; {available / (1 << 30):.1f} GiB available")


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warn_cut(what: str, tokenizer, text: str, counted: int | None = None) -> None:
    n = tokenizer.count(text) if counted is None else counted
    if n > tokenizer.max_length:
        note(f"note      {what} has {n} tokens: cut to the encoder's {tokenizer.max_length}")


# ---------------------------------------------------------------------------------------
# flux: UltraGen (image)
# ---------------------------------------------------------------------------------------


def check_loras(args) -> None:
    from models import lora

    for path, kind in [(args.guidance_lora, "guidance")] + [(p, "community") for p, _ in args.lora]:
        if path is None:
            continue
        try:
            lora.check_file(path, kind)
        except (ValueError, OSError) as e:
            flag = "--guidance-lora" if kind == "guidance" else "--lora"
            die(f"{flag} {path}: {str(e).splitlines()[0]}")


def load_flux_models(args, device, dtype):
    if args.demo:
        return demo.flux_models(device, dtype)
    from models.flux_files import load_flux
    from models.loading import CheckpointError

    files = dict(transformer=args.transformer, ae=args.ae, clip=args.clip, t5=args.t5)
    try:
        m = load_flux(args.model, **files, tokenizers=args.tokenizers, device=device, dtype=dtype)
    except CheckpointError as e:
        die(str(e))
    for part in ("transformer", "ae", "clip", "t5"):
        getattr(m, part).eval()
    return m


def run_flux(args) -> int:
    # everything that can be refused is refused before any model is loaded
    check_sources(args, ("transformer", "ae", "clip", "t5"), "--tokenizers")
    args.levels = args.levels or A.parse_levels("128,512" if args.demo else "1024,4096")
    args.seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    if args.steps is not None and args.skip is not None and args.skip >= args.steps:
        die(f"--skip must be in 0..{args.steps - 1} for {args.steps} steps, got {args.skip}")
    settings = ultragen_image.Settings(**{f.name: getattr(args, f.name) for f in fields(
        ultragen_image.Settings)})  # fmt: skip
    try:
        ratios = ultragen_image.level_ratios(settings)
    except ValueError as e:
        die(f"--ratio auto: {e}")
    for size, ratio in zip(args.levels[1:], ratios):
        try:
            sampling.hierarchical_layout(size, 0, args.window, ratio)
        except ValueError as e:
            die(f"level {size[1]}x{size[0]}: {e}")
    check_loras(args)
    h, w = args.levels[-1]
    out = reserve_output(args, f"{'demo' if args.demo else 'flux'}-{args.seed}-{w}x{h}", ".png")

    with out:  # the reserved file is removed if anything below fails
        device, dtype = pick_device(args)
        if args.demo:
            note(demo.DEMO_IMAGE_WARNING)
        started = time.perf_counter()
        models = load_flux_models(args, device, dtype)
        try:
            ultragen_image.resolve(settings, models.variant)
        except ValueError as e:
            die(f"--skip: {e}")
        for f in fields(settings):  # the resolved defaults go into the PNG's settings
            setattr(args, f.name, getattr(settings, f.name))
        ultragen_image.add_loras(models.transformer, args.lora, args.guidance_lora, note)
        note(f"model     {models.variant}{' (tiny demo)' if args.demo else ''} on {device}, "
             f"{dtype}")  # fmt: skip
        warn_cut("the prompt (CLIP)", models.clip_tokenizer, args.prompt)
        warn_cut("the prompt (T5)", models.t5_tokenizer, args.prompt)

        with torch.inference_mode():
            cond = ultragen_image.encode_prompt(
                models, args.prompt, device, dtype, settings.guidance_scale
            )
            models.clip = models.t5 = None  # the text encoders are done: free their memory
            free_memory(device)
            est, (mh, mw) = ultragen_image.peak_memory(models, cond.n_text, settings, ratios, dtype)
            check_memory(args, device, est, f"level {mw}x{mh} ", "smaller --levels, --dtype bf16")
            if len(args.levels) > 1 and not args.guidance_lora:
                note("note      no --guidance-lora: guidance tokens use the base weights")
            noise_gen = torch.Generator().manual_seed(args.seed)  # CPU: same on any device
            latent, levels = ultragen_image.sample(
                models, cond, settings, noise_gen, Progress, note
            )
            t = time.perf_counter()
            image = ultragen_image.decode(models.ae, latent, settings)  # (1, 3, H, W)
            note(f"decode    {w}x{h} in {time.perf_counter() - t:.1f} s")

        meta = dict(
            prompt=args.prompt, seed=args.seed, model=models.variant, demo=args.demo,
            levels=levels, settings=media.settings_json(args), software="ultrares sample.py",
            torch=torch.__version__, seconds=round(time.perf_counter() - started, 2),
        )  # fmt: skip
        text = {"Software": "ultrares sample.py"}
        if args.demo:
            meta["warning"] = text["Warning"] = demo.DEMO_IMAGE_WARNING
        text["parameters"] = json.dumps(meta, ensure_ascii=True)
        media.write_png(out, media.to_rgb(image), text)
    note(f"wrote     {out.path} ({w}x{h}, seed {args.seed})")
    if args.demo:
        note(demo.DEMO_IMAGE_WARNING)
    return 0


# ---------------------------------------------------------------------------------------
# wan: plain Wan2.1 text-to-video
# ---------------------------------------------------------------------------------------


def load_wan_parts(args, device, dtype, parts):
    if args.demo:
        m = demo.wan_models(device, dtype, parts=parts)
        return m
    from models.loading import CheckpointError
    from models.wan_files import load_wan

    files = dict(transformer=args.transformer, vae=args.vae, umt5=args.umt5,
                 tokenizer=args.tokenizer)  # fmt: skip
    try:
        m = load_wan(args.model, **files, device=device, dtype=dtype, parts=parts)
    except CheckpointError as e:
        die(str(e))
    for part in ("transformer", "vae", "umt5"):
        if getattr(m, part) is not None:
            getattr(m, part).eval()
    return m


def run_wan(args) -> int:
    check_sources(args, ("transformer", "vae", "umt5", "tokenizer"), "")
    if args.demo:
        args.size = args.size or (128, 128)
    args.frames = args.frames or (17 if args.demo else 81)
    args.steps = args.steps or (8 if args.demo else 50)
    args.seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    size = f"-{args.size[1]}x{args.size[0]}" if args.size else ""
    out = reserve_output(args, f"{'demo' if args.demo else 'wan'}-{args.seed}{size}", ".mp4")

    with out:
        device, dtype = pick_device(args)
        if args.demo:
            note(demo.DEMO_VIDEO_WARNING)
        started = time.perf_counter()
        # 1. the prompts: the tokenizer, then umT5, freed before the transformer loads
        tokenizer = (
            demo.t5_demo_tokenizer(demo.WAN_DEMO_TEXT_LEN) if args.demo
            else load_wan_parts(args, device, dtype, ("tokenizer",)).tokenizer
        )  # fmt: skip
        warn_cut("the prompt", tokenizer, args.prompt)
        warn_cut("the negative prompt", tokenizer, args.negative_prompt)
        text = load_wan_parts(args, device, dtype, ("tokenizer", "umt5"))
        note(f"text      umT5 on {device}, {dtype}: encoding the prompt and the negative prompt")
        with torch.inference_mode():
            context, context_null = wan_t2v.encode_prompts(
                text.umt5, text.tokenizer, args.prompt, args.negative_prompt,
                text.tokenizer.max_length,
            )  # fmt: skip
        del text
        free_memory(device)
        # 2. the transformer and the VAE
        m = load_wan_parts(args, device, dtype, ("transformer", "vae"))
        variant = "wan-tiny-demo" if args.demo else wan.variant_of(m.transformer.config)
        args.size = args.size or wan_t2v.default_size(variant)
        warning = None if args.demo else wan_t2v.size_warning(variant, args.size)
        if warning:
            note(f"warning   {warning}")
        note(f"model     {variant} on {device}, {dtype}")
        est = wan_t2v.peak_memory(m.transformer, m.vae, args.size, args.frames)
        h, w = args.size
        check_memory(args, device, est, f"{w}x{h}x{args.frames} ", "a smaller --size or --frames")
        settings = wan_t2v.Settings(size=args.size, frames=args.frames, steps=args.steps,
                                    guidance=args.cfg, shift=args.shift, solver=args.solver,
                                    negative_prompt=args.negative_prompt)  # fmt: skip
        with torch.inference_mode():
            x = wan_t2v.noise(args.size, args.frames, args.seed).to(device)
            latent, info = wan_t2v.sample(
                m.transformer, context.to(dtype), context_null.to(dtype), x, settings, Progress
            )
            m.transformer = None  # freed before the decode
            free_memory(device)
            t = time.perf_counter()
            video = m.vae.decode_video(latent, tile=args.vae_tile, overlap=args.vae_overlap)
            note(f"decode    {video.shape[2]} frames in {time.perf_counter() - t:.1f} s")
        meta = dict(
            prompt=args.prompt, seed=args.seed, model=variant, demo=args.demo, sampling=info,
            settings=media.settings_json(args), software="ultrares sample.py",
            torch=torch.__version__, seconds=round(time.perf_counter() - started, 2),
        )  # fmt: skip
        if args.demo:
            meta["warning"] = demo.DEMO_VIDEO_WARNING
        message = video_file.write_video(out, video[0], args.fps, meta)
    if message:
        note(f"note      {message}")
    note(f"wrote     {out.path} ({w}x{h}, {args.frames} frames at {args.fps} fps, seed "
         f"{args.seed})")  # fmt: skip
    if args.demo:
        note(demo.DEMO_VIDEO_WARNING)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_flux(args) if args.family == "flux" else run_wan(args)


if __name__ == "__main__":
    sys.exit(main())
