"""Tiny models with random weights for `--demo`: the whole pipeline runs with no weights.

What they produce checks that every stage runs end to end (text encoders, sampler,
hierarchical attention, VAE, file); it is not a picture or a video. Weights are drawn
from `weight_seed` (the sampling seed only changes the noise), so a demo run is
reproducible. Used by sample.py and train.py (`--demo`) and by the tests.
"""

import string

import torch

DEMO_IMAGE_WARNING = (
    "DEMO: tiny models with random weights (seeded). This image checks that the pipeline "
    "runs end to end; it is not a picture."
)
DEMO_VIDEO_WARNING = (
    "DEMO: tiny models with random weights (seeded). This video checks that the pipeline "
    "runs end to end; it is not a video of anything."
)


def t5_demo_tokenizer(max_length: int):
    """A unigram tokenizer over printable ASCII characters (about 190 pieces), built in
    memory: T5 / umT5 ids for the tiny encoders (vocab 1000)."""
    from models.tokenizers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    return T5Tokenizer(pieces, unk_id=2, max_length=max_length, extra_ids=0)


def clip_demo_tokenizer():
    """CLIP BPE over the 256 byte-level symbols (no merges), EOS the largest id (CLIP
    pools at argmax(ids))."""
    from tokenizers import pre_tokenizers

    from models.tokenizers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab, [], max_length=77)


def flux_models(device, dtype, weight_seed: int = 0):
    """FluxModels of the tiny presets (transformer, AE, CLIP, T5) with random weights."""
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
    m.clip_tokenizer, m.t5_tokenizer = clip_demo_tokenizer(), t5_demo_tokenizer(cfg.t5_length)
    for part in ("transformer", "ae", "clip", "t5"):
        setattr(m, part, getattr(m, part).to(device=device, dtype=dtype).eval())
    return m


# The Wan demo: the tiny presets, with the transformer's text width set to the tiny umT5's
# (64) and its context to the real 512 rows, so the text pipeline (cut at 512 tokens,
# zero-padded) is exactly the real one.
WAN_DEMO_TEXT_LEN = 512


def wan_models(device, dtype, weight_seed: int = 0, parts=("transformer", "vae", "umt5")):
    """WanModels of the tiny presets (transformer, VAE, umT5, tokenizer), random weights."""
    from models import umt5, wan, wan_vae
    from models.wan_files import WanModels

    m = WanModels()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weight_seed)
        text = umt5.PRESETS["tiny"]
        m.transformer = wan.Wan(
            wan.preset("tiny", text_dim=text.d_model, text_len=WAN_DEMO_TEXT_LEN)
        )
        m.vae = wan_vae.WanVAE(wan_vae.PRESETS["tiny"])
        m.umt5 = umt5.UMT5Encoder(text)
    m.tokenizer = t5_demo_tokenizer(WAN_DEMO_TEXT_LEN)
    for part in ("transformer", "vae", "umt5"):
        module = getattr(m, part) if part in parts else None
        setattr(m, part, None if module is None else module.to(device=device, dtype=dtype).eval())
    return m
