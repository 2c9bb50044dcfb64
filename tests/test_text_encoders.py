"""CLIP-L and T5-v1.1-XXL text encoders (models/clip.py, models/t5.py) against transformers.

transformers is the oracle: its CLIPTextModel / T5EncoderModel with the published configs
(written out below), their state dicts through models.keymaps, loaded into ours.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from models import clip, t5
from models.keymaps import clip_keys, t5_keys

# openai/clip-vit-large-patch14 config.json, "text_config" (FLUX.1 text_encoder/config.json
# has the same numbers, including the legacy bos/eos/pad ids 0/2/1)
HF_CLIP_L = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# google/t5-v1_1-xxl config.json (FLUX.1 text_encoder_2/config.json): buckets and max
# distance are transformers' defaults there
HF_T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_heads=64,
    num_layers=24,
    num_decoder_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    dropout_rate=0.1,
)


def hf_clip_config(cfg: clip.CLIPConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        **dataclasses.asdict(cfg),
        projection_dim=cfg.hidden_size,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def hf_t5_config(cfg: t5.T5Config) -> T5Config:
    return T5Config(**dataclasses.asdict(cfg), feed_forward_proj="gated-gelu", dropout_rate=0.0)


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_same_keys(ours: dict, theirs: dict):
    missing, unexpected = ours.keys() - theirs.keys(), theirs.keys() - ours.keys()
    assert not missing and not unexpected, (
        f"missing {sorted(missing)} unexpected {sorted(unexpected)}"
    )
    wrong = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not wrong, f"shapes (ours, theirs): {wrong}"


# ---------------------------------------------------------------------------------------
# 1. Full size, on the meta device: key for key, shape for shape
# ---------------------------------------------------------------------------------------


def test_presets_are_the_published_configs():
    ours = dataclasses.asdict(clip.PRESETS["clip-l"])
    assert ours == {k: HF_CLIP_L[k] for k in ours}
    ours = dataclasses.asdict(t5.PRESETS["t5-xxl"])
    assert ours == {k: HF_T5_XXL[k] for k in ours}
    # transformers reads "gated-gelu" as gelu_new, the tanh approximation our FFN uses
    assert T5Config(**HF_T5_XXL).dense_act_fn == "gelu_new"
    assert T5Config(**HF_T5_XXL).is_gated_act


def test_clip_l_keys_and_shapes():
    with torch.device("meta"):
        hf = CLIPTextModel(CLIPTextConfig(**HF_CLIP_L))
        ours = clip.CLIPTextEncoder(clip.PRESETS["clip-l"])
    hf_sd = hf.state_dict()
    theirs = shapes(clip_keys(hf_sd))
    assert_same_keys(shapes(ours.state_dict()), theirs)
    assert len(theirs) == 2 + 16 * 12 + 2
    assert sum(v.numel() for v in ours.parameters()) == 123_060_480
    assert list(ours.buffers()) == []
    # a file with the prefix and the position_ids buffer (as FLUX's text_encoder ships)
    prefixed = {"text_model." + k: v for k, v in hf_sd.items()}
    prefixed["text_model.embeddings.position_ids"] = torch.empty(1, 77, device="meta")
    assert_same_keys(shapes(ours.state_dict()), shapes(clip_keys(prefixed)))
    # and one without it (transformers 5 writes CLIPTextModel without `text_model.`)
    unprefixed = {k.removeprefix("text_model."): v for k, v in prefixed.items()}
    assert not any(k.startswith("text_model.") for k in unprefixed)
    assert_same_keys(shapes(ours.state_dict()), shapes(clip_keys(unprefixed)))


def test_t5_xxl_keys_and_shapes():
    with torch.device("meta"):
        hf = T5EncoderModel(T5Config(**HF_T5_XXL))
        ours = t5.T5Encoder(t5.PRESETS["t5-xxl"])
    hf_sd = hf.state_dict()
    theirs = shapes(t5_keys(hf_sd))
    assert_same_keys(shapes(ours.state_dict()), theirs)
    assert theirs["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (
        32,
        64,
    )
    assert sum(v.numel() for v in ours.parameters()) == 4_762_310_656
    assert list(ours.buffers()) == []
    # the tied embedding under either name alone
    only_shared = {k: v for k, v in hf_sd.items() if k != "encoder.embed_tokens.weight"}
    only_embed = {k: v for k, v in hf_sd.items() if k != "shared.weight"}
    assert "shared.weight" not in only_embed
    for sd in (only_shared, only_embed):
        assert_same_keys(shapes(ours.state_dict()), shapes(t5_keys(sd)))


# ---------------------------------------------------------------------------------------
# 2. Tiny configs, fp32, random weights: ours equals transformers
# ---------------------------------------------------------------------------------------


def perturb_norms(model: torch.nn.Module, seed: int):
    """Random LayerNorm / RMSNorm weights (and biases) instead of ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(
                    1 + 0.5 * torch.randn(p.shape, generator=g)
                    if name.endswith("weight")
                    else 0.2 * torch.randn(p.shape, generator=g)
                )


def load_ours(cls, cfg, sd: dict, dtype=torch.float32):
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    return model.eval()


@pytest.fixture(scope="module")
def tiny_clip():
    cfg = clip.PRESETS["tiny"]
    torch.manual_seed(0)
    hf = CLIPTextModel._from_config(hf_clip_config(cfg), attn_implementation="eager").eval()
    perturb_norms(hf, 1)
    ours = load_ours(clip.CLIPTextEncoder, cfg, clip_keys(hf.state_dict()))
    return cfg, hf, ours


@pytest.fixture(scope="module")
def tiny_t5():
    cfg = t5.PRESETS["tiny"]
    torch.manual_seed(0)
    hf = T5EncoderModel._from_config(hf_t5_config(cfg), attn_implementation="eager").eval()
    perturb_norms(hf, 2)
    with torch.no_grad():  # larger bias per bucket, so a wrong bucket shows
        hf.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 2)
    ours = load_ours(t5.T5Encoder, cfg, t5_keys(hf.state_dict()))
    return cfg, hf, ours


def clip_ids(cfg, B=3, L=77, seed=0):
    """Random ids below EOS, EOS (the largest id) at a different place in each row, then
    EOS padding (as FLUX pads): argmax must find the first EOS."""
    g = torch.Generator().manual_seed(seed)
    eos = cfg.vocab_size - 1
    ids = torch.randint(1, eos, (B, L), generator=g)
    ids[:, 0] = 0  # BOS stand-in
    for b, n in enumerate([5, 40, L - 1][:B]):
        ids[b, n:] = eos
    return ids


def test_clip_tiny_parity_fp32(tiny_clip):
    """fp32, max abs error <= 1e-5, pooled and last hidden state."""
    cfg, hf, ours = tiny_clip
    ids = clip_ids(cfg)
    with torch.no_grad():
        ref = hf(input_ids=ids)
        pooled, hidden = ours.encode(ids)
        pooled_fwd = ours(ids)
    err_h = (hidden - ref.last_hidden_state).abs().max().item()
    err_p = (pooled - ref.pooler_output).abs().max().item()
    print(f"CLIP tiny fp32: hidden {err_h:.2e}, pooled {err_p:.2e}")
    assert err_h <= 1e-5 and err_p <= 1e-5
    assert torch.equal(pooled_fwd, pooled)
    # the pooled rows are the first-EOS positions, which differ per row
    assert torch.equal(pooled, hidden[torch.arange(3), torch.tensor([5, 40, 76])])
    # the causal mask: a change at position 50 leaves earlier positions alone
    ids2 = ids.clone()
    ids2[1, 50] = 7
    with torch.no_grad():
        _, hidden2 = ours.encode(ids2)
    assert torch.allclose(hidden2[1, :50], hidden[1, :50], atol=1e-6)
    assert not torch.allclose(hidden2[1, 50:], hidden[1, 50:], atol=1e-3)


def test_clip_shorter_sequence(tiny_clip):
    cfg, hf, ours = tiny_clip
    ids = clip_ids(cfg, L=20)
    with torch.no_grad():
        ref = hf(input_ids=ids)
        pooled, hidden = ours.encode(ids)
    assert (hidden - ref.last_hidden_state).abs().max().item() <= 1e-5
    assert (pooled - ref.pooler_output).abs().max().item() <= 1e-5


def test_t5_buckets_match_transformers():
    """Bucket ids, exact integers, for the full preset's and the tiny preset's parameters,
    out to distances beyond max_distance."""
    for cfg, L in ((t5.PRESETS["t5-xxl"], 600), (t5.PRESETS["tiny"], 64)):
        n, m = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        ours = t5.relative_position_bucket(L, L, n, m)
        rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
        theirs = HFT5Attention._relative_position_bucket(rel, True, n, m)
        assert torch.equal(ours, theirs)
        # every bucket is reached but n/2: "after the query" starts at distance 1, not 0
        assert set(ours.unique().tolist()) == set(range(n)) - {n // 2}


def test_t5_tiny_parity_fp32(tiny_t5):
    """fp32, max abs error <= 1e-5; L = 40 > max_distance 20, so the exact (< 8), the log
    and the clamped buckets all take part."""
    cfg, hf, ours = tiny_t5
    assert 40 > cfg.relative_attention_max_distance
    g = torch.Generator().manual_seed(3)
    for L in (40, 7):
        ids = torch.randint(0, cfg.vocab_size, (2, L), generator=g)
        ids[:, L // 2 :] = 0  # padding, encoded and attended as FLUX does
        with torch.no_grad():
            ref = hf(input_ids=ids).last_hidden_state
            out = ours(ids)
        err = (out - ref).abs().max().item()
        print(f"T5 tiny fp32 L={L}: {err:.2e} (output scale {ref.abs().max().item():.2f})")
        assert out.shape == (2, L, cfg.d_model)
        assert err <= 1e-5


# ---------------------------------------------------------------------------------------
# 3. Lower precision
# ---------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_close_to_fp32(tiny_clip, tiny_t5):
    """bf16 weights and compute: finite, in bf16, relative L2 error < 3e-2 against fp32."""
    cfg, hf, ours = tiny_clip
    ids = clip_ids(cfg)
    ours16 = load_ours(clip.CLIPTextEncoder, cfg, clip_keys(hf.state_dict()), torch.bfloat16)
    with torch.no_grad():
        ref_p, ref_h = ours.encode(ids)
        p, h = ours16.encode(ids)
    assert p.dtype == h.dtype == torch.bfloat16
    assert torch.isfinite(p).all() and torch.isfinite(h).all()
    errs = rel_err(p, ref_p), rel_err(h, ref_h)
    print(f"CLIP tiny bf16 vs fp32: pooled {errs[0]:.2e}, hidden {errs[1]:.2e}")
    assert max(errs) < 3e-2

    cfg, hf, ours = tiny_t5
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    ours16 = load_ours(t5.T5Encoder, cfg, t5_keys(hf.state_dict()), torch.bfloat16)
    with torch.no_grad():
        ref, out = ours(ids), ours16(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = rel_err(out, ref)
    print(f"T5 tiny bf16 vs fp32: {err:.2e}")
    assert err < 3e-2


def test_t5_fp16_does_not_overflow(tiny_t5):
    """fp16 weights with an FFN whose output exceeds fp16's range (as T5-XXL's does):
    computed naively it is inf; ours (fp32 residual and wo) is finite and within relative
    L2 error 1e-2 of fp32."""
    cfg, hf, _ = tiny_t5
    sd = t5_keys(hf.state_dict())
    sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = (
        sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"] * 3e4
    )
    ours32 = load_ours(t5.T5Encoder, cfg, sd)
    ours16 = load_ours(t5.T5Encoder, cfg, sd, torch.float16)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = ours32(ids), ours16(ids)
        # the same FFN in plain fp16 overflows
        blk = ours16.encoder.block[0].layer[1]
        x = ours16.shared(ids)
        ffn = blk.DenseReluDense
        h = F.gelu(ffn.wi_0(blk.layer_norm(x)), approximate="tanh") * ffn.wi_1(blk.layer_norm(x))
        assert not torch.isfinite(ffn.wo(h)).all()
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    err = rel_err(out, ref)
    print(f"T5 tiny fp16 (overflowing FFN) vs fp32: {err:.2e}")
    assert err < 1e-2
