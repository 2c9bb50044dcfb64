"""Train UltraGen's guidance LoRA on FLUX.1: flow matching at commodity resolution.

    python train.py --model FLUX.1-dev/ --data photos/ --out runs/guidance --lr 1e-4
    torchrun --nproc-per-node 4 train.py ...      # the same script, DDP over 4 GPUs
    python train.py --demo --data photos/ --out runs/demo --size 256   # tiny random models

data:  a folder of images (png, jpg, webp, ...) with same-name .txt captions. Each image
       is resized (shorter side) and centre-cropped to --size; its guidance image is
       the same picture downscaled by --ratio. Unreadable images and images without a
       caption are skipped and counted, never fatal.
cache: the text encoders and the AE run once per image, and their outputs go to
       --cache (default OUT/cache), one file per image; then they are freed, so only
       the transformer is in memory while training. A changed image, caption or
       setting gets a new cache file.
model: FLUX.1 with a rank-16 LoRA on the q, k, v of the image stream (double blocks:
       img_attn.qkv; single blocks: the q|k|v rows of linear1), routed to the guidance
       tokens only. The base weights are frozen; only the LoRA trains (AdamW, weight
       decay 0.01).
step:  t ~ logit-normal (or uniform); x_t = (1 - t) x0 + t eps for the detail latent
       (and the guidance latent in `renoise` mode, with its own eps); the model sees
       [text | guidance | detail] with UltraGen's hierarchical attention and predicts
       v = eps - x0. Loss: the mean squared error over the detail tokens, and over the
       guidance tokens too in `renoise` mode. (`clean`: the guidance stays clean at its
       own t = 0 and gets no loss.)
out:   OUT/checkpoint.pt (LoRA + optimizer + step + RNG and data-order state, written
       atomically every --checkpoint-every steps; --resume continues exactly),
       OUT/log.jsonl (loss per step), OUT/lora.safetensors (the final LoRA in
       diffusers/PEFT naming: `sample.py flux --guidance-lora` and diffusers load it).
A NaN or infinite loss stops the run; the last good checkpoint stays as it was.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from attention import MaskRule, Plan
from models import lora, sampling
from models.arguments import parse_size, parse_window
from models.demo import flux_models as demo_models
from models.flux import layout_ids, pack, to_layout
from models.progress import Progress
from models.progress import clock as _clock
from models.sampling import pick_backend
from models.ultragen_image import encode_prompt

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHECKPOINT = "checkpoint.pt"
FORMAT = 1  # checkpoint layout version
# settings a resumed run must share with the run that wrote the checkpoint
FIXED = ("rank", "alpha", "size", "ratio", "window", "guidance_mode", "model_id", "seed")


def note(msg: str) -> None:
    if RANK == 0:
        print(msg, file=sys.stderr, flush=True)


def die(msg: str, code: int = 2):
    print(f"train.py: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model files (as sample.py)")
    g.add_argument("--model", metavar="DIR", help="FLUX.1 snapshot folder (Hugging Face layout)")
    g.add_argument("--transformer", metavar="PATH", help="transformer file or folder")
    g.add_argument("--ae", metavar="PATH", help="autoencoder file or folder")
    g.add_argument("--clip", metavar="PATH", help="CLIP-L text encoder file or folder")
    g.add_argument("--t5", metavar="PATH", help="T5-XXL encoder file or folder")
    g.add_argument("--tokenizers", metavar="DIR", help="folder with tokenizer/ and tokenizer_2/")
    g.add_argument(
        "--variant", choices=("flux-dev", "flux-schnell"), default="flux-dev",
        help="sets the T5 length of the cached captions (512 / 256) before the transformer "
        "is loaded; checked against it (default: flux-dev)",
    )  # fmt: skip
    g.add_argument(
        "--demo",
        action="store_true",
        help="no weights: the tiny random models of `sample.py flux --demo` (checks the "
        "pipeline; the LoRA it trains is for those models only)",
    )

    g = p.add_argument_group("data and output")
    g.add_argument("--data", metavar="DIR", required=True, help="images + same-name .txt captions")
    g.add_argument("--out", metavar="DIR", required=True, help="run folder")
    g.add_argument("--cache", metavar="DIR", help="encoded images and captions (default OUT/cache)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt (without it, an existing checkpoint is an error)",
    )
    g.add_argument(
        "--checkpoint-every", type=int, default=250, metavar="N", help="(default: 250 steps)"
    )

    g = p.add_argument_group("UltraGen")
    g.add_argument(
        "--size", type=parse_size, default=(1024, 1024), metavar="N|WxH",
        help="detail resolution in px (default: 1024)",
    )  # fmt: skip
    g.add_argument(
        "--ratio", type=int, default=4, help="guidance = detail / ratio (default: 4, 256 px)"
    )
    g.add_argument(
        "--window", type=parse_window, default=(16, 16), metavar="N|HxW",
        help="detail window in tokens (default: 16)",
    )  # fmt: skip
    g.add_argument(
        "--neighbours", choices=("halo", "none", "shift"), default="halo",
        help="cross-window attention, as in sample.py (default: halo)",
    )  # fmt: skip
    g.add_argument("--halo", type=int, default=1, metavar="K", help="(default: 1)")
    g.add_argument(
        "--scope", choices=("aligned", "all"), default="aligned", help="(default: aligned)"
    )
    g.add_argument("--margin", type=int, default=1, metavar="M", help="(default: 1)")
    g.add_argument(
        "--guidance-mode", choices=("renoise", "clean"), default="renoise",
        help="renoise: guidance noised to t and in the loss; clean: at t = 0 (default: renoise)",
    )  # fmt: skip
    g.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default: 16)")
    g.add_argument(
        "--guidance-scale", type=float, default=3.5,
        help="FLUX.1-dev's distilled guidance input while training (default: 3.5)",
    )  # fmt: skip

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: 2000)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="(default: 0.01)")
    g.add_argument("--batch-size", type=int, default=1, help="per process (default: 1)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    g.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="clip; 0 turns it off (default: 1.0)"
    )
    g.add_argument(
        "--timesteps", choices=("logit-normal", "uniform"), default="logit-normal",
        help="how t is drawn (default: logit-normal, mean 0, std 1)",
    )  # fmt: skip
    g.add_argument("--logit-mean", type=float, default=0.0)
    g.add_argument("--logit-std", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="data order, t and noise (default: 0)")
    g.add_argument(
        "--precision", choices=("bf16", "fp32"),
        help="bf16: bf16 base weights and autocast, fp32 LoRA (default on GPU); fp32 (CPU)",
    )  # fmt: skip
    g.add_argument(
        "--no-grad-checkpointing", action="store_true",
        help="keep activations instead of recomputing them (more memory, a little faster)",
    )  # fmt: skip
    g.add_argument("--device", help="(default: cuda when available, else cpu)")
    return p


def check_args(args) -> None:
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "rank", "ratio"):
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        die(f"--lr must be > 0, got {args.lr}")
    if not Path(args.data).is_dir():
        die(f"--data {args.data}: not a folder")
    if args.demo and any((args.model, args.transformer, args.ae, args.clip, args.t5)):
        die("--demo uses tiny random models; it takes no model files")


def model_id(args) -> str:
    if args.demo:
        return "demo"
    parts = (args.model, args.transformer, args.ae, args.clip, args.t5)
    return "|".join(str(Path(p).resolve()) if p else "" for p in parts)


# ---------------------------------------------------------------------------------------
# processes: one, or one per GPU under torchrun (DDP)
# ---------------------------------------------------------------------------------------

RANK, WORLD = 0, 1


def setup_processes(args) -> torch.device:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: then one process per device, DDP."""
    global RANK, WORLD
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        cuda = torch.cuda.is_available() and args.device in (None, "cuda")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        RANK, WORLD = dist.get_rank(), dist.get_world_size()
        return torch.device("cuda", local) if cuda else torch.device("cpu")
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def all_ranks_agree(flag: bool) -> bool:
    """True if flag is true on any rank (all ranks then act alike)."""
    if WORLD == 1:
        return flag
    t = torch.tensor([float(flag)], device=DEVICE)
    dist.all_reduce(t)
    return t.item() > 0


def mean_over_ranks(x: float) -> float:
    if WORLD == 1:
        return x
    t = torch.tensor([x], device=DEVICE, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / WORLD


DEVICE = torch.device("cpu")


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


def scan(folder: Path, skipped: Counter) -> list[tuple[Path, str]]:
    """(image, caption) pairs, sorted by name; images with no .txt are counted."""
    items = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTS or not path.is_file():
            continue
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            skipped["no caption (.txt)"] += 1
            continue
        try:
            caption = txt.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            skipped["unreadable caption"] += 1
            continue
        items.append((path, caption))
    return items


def read_image(path: Path) -> torch.Tensor:
    """An image file -> (3, H, W) float in [-1, 1]. Pillow when installed; otherwise
    8-bit PNGs through the standard library. Raises on anything unreadable."""
    try:
        from PIL import Image
    except ImportError:
        if path.suffix.lower() != ".png":
            raise ValueError("reading this format needs Pillow (pip install pillow)") from None
        rgb = read_png_pixels(path.read_bytes())
    else:
        with Image.open(path) as im:
            im.load()  # decode now: truncated or corrupt files fail here
            rgb = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            rgb = rgb.view(im.height, im.width, 3)
    return rgb.permute(2, 0, 1).float() / 127.5 - 1


def read_png_pixels(data: bytes) -> torch.Tensor:
    """8-bit, non-interlaced grey / RGB / grey+alpha / RGBA PNG -> (H, W, 3) uint8."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, head = 8, [], None
    while pos + 8 <= len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if len(body) != n or zlib.crc32(kind + body) != int.from_bytes(
            data[pos + 8 + n : pos + 12 + n], "big"
        ):
            raise ValueError("truncated or corrupt PNG chunk")
        if kind == b"IHDR":
            head = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    if head is None or not idat:
        raise ValueError("PNG without IHDR or IDAT")
    w, h = int.from_bytes(head[0:4], "big"), int.from_bytes(head[4:8], "big")
    depth, color, interlace = head[8], head[9], head[12]
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError("only 8-bit non-interlaced grey/RGB(A) PNGs without Pillow")
    raw = zlib.decompress(b"".join(idat))
    stride = w * channels
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    px = torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).view(h, w, channels)
    return px[..., :3] if channels >= 3 else px[..., :1].expand(h, w, 3)


def fit(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) -> (3, H, W): scaled so it covers (H, W), then centre-cropped."""
    H, W = size
    h, w = image.shape[-2:]
    s = max(H / h, W / w)
    nh, nw = max(H, round(h * s)), max(W, round(w * s))
    x = F.interpolate(image[None], size=(nh, nw), mode="bicubic", antialias=True)[0]
    top, left = (nh - H) // 2, (nw - W) // 2
    return x[:, top : top + H, left : left + W].clamp(-1, 1)


def guidance_size(size, ratio: int) -> tuple[int, int]:
    """The guidance image in px: 16 px per token on ceil(token grid / ratio)."""
    gh, gw = (math.ceil(n / ratio) for n in sampling.token_grid(size))
    return 16 * gh, 16 * gw


def cache_name(image: Path, caption: str, args) -> str:
    st = image.stat()
    key = [str(image.resolve()), st.st_size, st.st_mtime_ns, caption, args.size, args.ratio]
    key += [model_id(args)]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:20] + ".safetensors"


@torch.no_grad()
def build_cache(args, items, cache: Path, device, skipped: Counter) -> list[Path]:
    """Encodes the items not yet in the cache (this rank's share) and returns every
    cache file of the data set, in the data set's order."""
    names = [cache / cache_name(img, cap, args) for img, cap in items]
    for n in names:  # images found unreadable before: counted again, not read again
        if n.with_suffix(".skip").exists():
            skipped["unreadable image"] += 1
    todo = [
        i
        for i, n in enumerate(names)
        if not n.exists() and not n.with_suffix(".skip").exists() and i % WORLD == RANK
    ]
    if todo:
        cache.mkdir(parents=True, exist_ok=True)
        models = text_and_ae(args, device)
        dtype = next(models.ae.parameters()).dtype
        g_px = guidance_size(args.size, args.ratio)
        progress = Progress(f"cache     {len(todo)} images", len(todo), device)
        for i in todo:
            image, caption = items[i]
            try:
                x = read_image(image)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped
                skipped["unreadable image"] += 1
                why = f"{type(e).__name__}: {e}"
                names[i].with_suffix(".skip").write_text(f"{image}\n{why}\n")
                print(f"\nskipped   {image.name}: {why}", file=sys.stderr, flush=True)
                progress.step()
                continue
            detail = fit(x, args.size)
            guide = F.interpolate(detail[None], size=g_px, mode="bicubic", antialias=True)
            cond = encode_prompt(models, caption, device, dtype, None)
            tensors = {
                "detail": models.ae.encode(detail[None].to(device, dtype))[0].float().cpu(),
                "guidance": models.ae.encode(guide.clamp(-1, 1).to(device, dtype))[0].float().cpu(),
                "txt": cond.txt[0].cpu().contiguous(),
                "y": cond.y[0].cpu().contiguous(),
            }
            tmp = names[i].with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"image": str(image), "caption": caption})
            os.replace(tmp, names[i])
            progress.step()
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if WORLD > 1:
        dist.barrier()
        counts = [None] * WORLD
        dist.all_gather_object(counts, dict(skipped))
        skipped.clear()
        for c in counts:
            skipped.update(c)
    return [n for n in names if n.exists()]


def text_and_ae(args, device):
    """The text encoders, tokenizers and AE (not the transformer)."""
    dtype = torch.bfloat16 if precision(args, device) == "bf16" else torch.float32
    if args.demo:
        m = demo_models(device, dtype)
        m.transformer = None
        return m
    from models.flux_files import load_flux
    from models.loading import CheckpointError

    if args.model is None and not all((args.ae, args.clip, args.t5, args.tokenizers)):
        die("no weights: pass --model SNAPSHOT_FOLDER, or --ae --clip --t5 --tokenizers")
    try:
        return load_flux(
            args.model, ae=args.ae, clip=args.clip, t5=args.t5, tokenizers=args.tokenizers,
            device=device, dtype=dtype, parts=("ae", "clip", "t5", "tokenizers"),
            variant=args.variant,
        )  # fmt: skip
    except CheckpointError as e:
        die(str(e))


class Batches:
    """Cache files in a seeded random order, epoch after epoch; each step takes the
    next batch_size · world files and this rank its share. Its state is checkpointed."""

    def __init__(self, files: list[Path], batch: int, seed: int):
        self.files, self.batch = files, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.cursor, self.epoch = self._shuffle(), 0, 0

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(len(self.files), generator=self.gen)

    def next(self, skipped: Counter) -> dict[str, torch.Tensor]:
        items = []
        while len(items) < self.batch * WORLD:
            if self.cursor == len(self.order):
                self.order, self.cursor, self.epoch = self._shuffle(), 0, self.epoch + 1
            path = self.files[self.order[self.cursor]]
            self.cursor += 1
            try:
                items.append(load_file(str(path)))
            except Exception:  # noqa: BLE001 - a damaged cache file is skipped
                skipped["unreadable cache file"] += 1
                if skipped["unreadable cache file"] > len(self.files):
                    die("no readable cache file; delete the cache folder and run again")
        mine = items[RANK * self.batch : (RANK + 1) * self.batch]
        return {k: torch.stack([it[k] for it in mine]) for k in mine[0]}

    def state(self) -> dict:
        return dict(
            order=self.order, cursor=self.cursor, epoch=self.epoch, gen=self.gen.get_state()
        )

    def load(self, s: dict) -> None:
        self.order, self.cursor, self.epoch = s["order"], s["cursor"], s["epoch"]
        self.gen.set_state(s["gen"])


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------


def precision(args, device) -> str:
    return args.precision or ("bf16" if device.type == "cuda" else "fp32")


def load_transformer(args, device, dtype):
    if args.demo:
        return demo_models(device, dtype).transformer
    from models.flux_files import load_flux_transformer, snapshot_parts
    from models.loading import CheckpointError

    try:
        source = args.transformer or (
            snapshot_parts(args.model)["transformer"] if args.model else None
        )
        if source is None:
            die("no transformer: pass --model SNAPSHOT_FOLDER or --transformer PATH")
        return load_flux_transformer(source, device=device, dtype=dtype)
    except CheckpointError as e:
        die(str(e))


def trainable_model(args, device):
    """The transformer, frozen, with the routed guidance LoRA in fp32: (model, names)."""
    dtype = torch.bfloat16 if precision(args, device) == "bf16" else torch.float32
    model = load_transformer(args, device, dtype)
    variant = "flux-dev" if model.config.guidance_embed else "flux-schnell"
    if variant != args.variant:
        die(
            f"the transformer is {variant}, but --variant is {args.variant} (it sets the T5 "
            f"length of the cached captions): pass --variant {variant} and a fresh --cache"
        )
    model.requires_grad_(False)
    names = lora.add_guidance_lora(model, rank=args.rank, alpha=args.alpha)
    for m in lora.lora_modules(model).values():
        m.lora_A.float()
        m.lora_B.float()
    torch.manual_seed(args.seed)  # the LoRA's initial A (B starts at zero)
    for m in lora.lora_modules(model).values():
        m.reset_lora_parameters()
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    model.gradient_checkpointing = not args.no_grad_checkpointing
    return model.train(), names


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    layout: object  # attention.Layout of [text | guidance | detail]
    plan: Plan
    txt_ids: torch.Tensor  # (B, L_txt, 3)
    img_ids: torch.Tensor  # (B, L_img, 3), layout order
    guidance_scale: float | None  # dev's distilled guidance input; None for schnell
    mode: str  # "renoise" or "clean"


def draw_t(n: int, args, gen: torch.Generator) -> torch.Tensor:
    """(n,) times in (0, 1): sigmoid(N(mean, std)) or uniform."""
    if args.timesteps == "uniform":
        return torch.rand(n, generator=gen)
    return torch.sigmoid(torch.randn(n, generator=gen) * args.logit_std + args.logit_mean)


def flow_matching_loss(model, batch: dict, s: Setup, t, eps_d, eps_g) -> torch.Tensor:
    """Mean squared error between the model's velocity and eps - x0, in fp32.

    batch: detail (B, 16, H/8, W/8), guidance (B, 16, h/8, w/8) latents, txt, y.
    t (B,); eps_d, eps_g: noise like the packed detail and guidance."""
    x0, g0 = pack(batch["detail"]), pack(batch["guidance"])  # (B, Ld, 64), (B, Lg, 64)
    B, dtype = x0.shape[0], batch["txt"].dtype
    tt = t.view(B, 1, 1)
    x_t = sampling.noised(x0, eps_d, tt)
    if s.mode == "renoise":
        g_in, g_time = sampling.noised(g0, eps_g, tt), None
    else:
        g_in, g_time = g0, torch.zeros_like(t)
    img = to_layout(s.layout, x_t, g_in)  # (B, Lg + Ld, 64), layout order
    target = to_layout(s.layout, eps_d - x0, eps_g - g0)
    gs = None if s.guidance_scale is None else torch.full_like(t, s.guidance_scale)
    v = model(
        img.to(dtype), s.img_ids, batch["txt"], s.txt_ids, t, batch["y"], gs,
        plan=s.plan, ntk_factor=1.0, n_guidance=s.layout.n_guidance, guidance_timesteps=g_time,
    )  # fmt: skip
    first = 0 if s.mode == "renoise" else s.layout.n_guidance  # clean: detail tokens only
    return (v[:, first:].float() - target[:, first:]).square().mean()


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a crash
    at any moment leaves either the old checkpoint or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        die(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})")
    if state.get("format") != FORMAT:
        die(f"{path}: checkpoint format {state.get('format')}, this train.py reads {FORMAT}")
    return state


def rng_states(noise_gen: torch.Generator) -> dict:
    """This rank's noise generator and the global RNGs (gathered on rank 0)."""
    mine = dict(noise=noise_gen.get_state(), torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state_all()
    if WORLD == 1:
        return dict(ranks=[mine])
    every = [None] * WORLD
    dist.all_gather_object(every, mine)
    return dict(ranks=every)


def set_rng_states(s: dict, noise_gen: torch.Generator) -> None:
    if len(s["ranks"]) != WORLD:
        note(f"resume    the checkpoint has {len(s['ranks'])} processes' RNG states, this run "
             f"{WORLD}: the noise continues from a fresh seed, not exactly")  # fmt: skip
        noise_gen.manual_seed(hash((noise_gen.initial_seed(), RANK)) & 0xFFFFFFFF)
        return
    mine = s["ranks"][RANK]
    noise_gen.set_state(mine["noise"])
    torch.set_rng_state(mine["torch"])
    random.setstate(_tuples(mine["python"]))
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])


def _tuples(x):
    return tuple(_tuples(i) for i in x) if isinstance(x, list | tuple) else x


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------


class StopRequest:
    """Ctrl-C once: finish the step, write a checkpoint, stop. Twice: stop now."""

    def __init__(self):
        self.asked = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def close(self):
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, *_):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        note("\ninterrupt: stopping after this step with a checkpoint (Ctrl-C again: now)")


def train(args, stop: StopRequest) -> int:
    global DEVICE
    DEVICE = device = setup_processes(args)
    check_args(args)
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not args.resume:
        die(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    if args.resume and not ckpt_path.exists():
        die(f"--resume: no {ckpt_path}")
    resumed = load_checkpoint(ckpt_path) if args.resume else None
    settings = {k: getattr(args, k) for k in FIXED if k != "model_id"}
    settings = json.loads(json.dumps({**settings, "model_id": model_id(args)}))
    if resumed is not None:
        old = json.loads(resumed["settings"])
        diff = {k: (old.get(k), settings[k]) for k in FIXED if old.get(k) != settings[k]}
        if diff:
            die(f"--resume: settings differ from the checkpoint's (was, now): {diff}")
    out.mkdir(parents=True, exist_ok=True)

    skipped = Counter()
    items = scan(Path(args.data), skipped)
    files = build_cache(args, items, Path(args.cache or out / "cache"), device, skipped)
    if skipped:
        note("skipped   " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    if not files:
        die(f"--data {args.data}: no usable image (with a .txt caption) found")
    note(f"data      {len(files)} images")

    model, names = trainable_model(args, device)
    params = lora.lora_parameters(model)
    n_params = sum(p.numel() for p in params)
    note(f"model     {len(names)} routed LoRA layers, rank {args.rank}, {n_params:,} parameters")
    n_text = model.config.t5_length
    layout = sampling.hierarchical_layout(args.size, n_text, args.window, args.ratio)
    rule = MaskRule(
        scope=args.scope, margin=args.margin, neighbours=args.neighbours, halo=args.halo
    )
    plan = Plan(layout, rule, backend=pick_backend("auto", device, layout.n))
    txt_ids, img_ids = layout_ids(layout, args.batch_size, device)
    guidance = args.guidance_scale if model.config.guidance_embed else None
    setup = Setup(layout, plan, txt_ids, img_ids, guidance, args.guidance_mode)
    net = model
    if WORLD > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    batches = Batches(files, args.batch_size, args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed * 1000 + 1 + RANK)
    step = 0
    if resumed is not None:
        lora_now = dict(model.named_parameters())
        for n, t in resumed["lora"].items():
            lora_now[n].data.copy_(t)
        opt.load_state_dict(resumed["optimizer"])
        batches.load(resumed["data"])
        set_rng_states(resumed["rng"], noise_gen)
        step = resumed["step"]
        note(f"resume    from step {step}")
    if step >= args.steps:
        note(f"done      already at step {step} of {args.steps}")

    def checkpoint_state():
        return dict(
            format=FORMAT, step=step, lora=lora_state(model), optimizer=opt.state_dict(),
            data=batches.state(), rng=rng_states(noise_gen), settings=json.dumps(settings),
        )  # fmt: skip

    def write_checkpoint():
        state = checkpoint_state()  # every rank joins the RNG gather
        if RANK == 0:
            save_checkpoint(ckpt_path, state)

    bf16 = precision(args, device) == "bf16"
    log = open(out / "log.jsonl", "a") if RANK == 0 else None
    start, first = time.perf_counter(), step
    last_saved = resumed["step"] if resumed is not None else None
    while step < args.steps:
        step_start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses = []
        for micro in range(args.grad_accum):
            batch = {k: v.to(device) for k, v in batches.next(skipped).items()}
            if batch["txt"].shape[1] != n_text:
                die(f"cached captions have {batch['txt'].shape[1]} T5 tokens, the model "
                    f"{n_text}: use a fresh --cache for this model")  # fmt: skip
            batch["txt"] = batch["txt"].to(model.img_in.weight.dtype)
            batch["y"] = batch["y"].to(model.img_in.weight.dtype)
            B = batch["detail"].shape[0]
            t = draw_t(B, args, noise_gen)
            eps_d = pack(torch.randn(batch["detail"].shape, generator=noise_gen)).to(device)
            eps_g = pack(torch.randn(batch["guidance"].shape, generator=noise_gen)).to(device)
            sync = WORLD == 1 or micro == args.grad_accum - 1
            ctx = contextlib.nullcontext() if sync else net.no_sync()
            with ctx, torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                loss = flow_matching_loss(net, batch, setup, t.to(device), eps_d, eps_g)
            value = loss.item()
            if all_ranks_agree(not math.isfinite(value)):
                return stop_on_bad_loss(step + 1, value, ckpt_path, last_saved, log)
            (loss / args.grad_accum).backward()
            losses.append(value)
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        step += 1
        loss_value = mean_over_ranks(sum(losses) / len(losses))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        per = (now - start) / (step - first)
        if log:
            row = dict(step=step, loss=loss_value, seconds=now - step_start)
            log.write(json.dumps(row) + "\n")
            log.flush()
            rate = f"{1 / per:.2f} it/s" if per < 1 else f"{per:.2f} s/it"
            eta = _clock((args.steps - step) * per)
            sys.stderr.write(
                f"\rstep {step}/{args.steps}  loss {loss_value:.4f}  {rate}  ETA {eta}  "
            )
            sys.stderr.flush()
        asked = all_ranks_agree(stop.asked)
        if step % args.checkpoint_every == 0 or step == args.steps or asked:
            write_checkpoint()
            last_saved = step
        if asked:
            note(f"\nstopped   at step {step}; continue with --resume")
            if log:
                log.close()
            return 130
    if RANK == 0:
        final = out / "lora.safetensors"
        tmp = final.with_name("lora.tmp.safetensors")
        meta = dict(ultrares_train=json.dumps({**settings, "steps": step, "lr": args.lr}))
        lora.save_lora(model, tmp, metadata=meta)
        os.replace(tmp, final)
        note(f"\nsaved     {final} (step {step}); sample with: python sample.py flux "
             f"--guidance-lora {final} ...")  # fmt: skip
    if log:
        log.close()
    return 0


def stop_on_bad_loss(step, value, ckpt_path: Path, last_saved, log) -> int:
    where = (
        f"the last good checkpoint, {ckpt_path} (step {last_saved}), is kept unchanged"
        if last_saved is not None
        else "no checkpoint had been written yet"
    )
    print(
        f"\ntrain.py: the loss is {value} at step {step}; stopping. Nothing of this step is "
        f"saved; {where}. Try a lower --lr.",
        file=sys.stderr,
        flush=True,
    )
    if log:
        log.close()
    return 3


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stop = StopRequest()
    try:
        return train(args, stop)
    finally:
        stop.close()
        if WORLD > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
