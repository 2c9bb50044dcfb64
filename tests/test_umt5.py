"""umT5-XXL (models/umt5.py, keymaps.umt5_from_wan) against transformers and Wan's pipeline.

The oracles: transformers' UMT5EncoderModel at the published config (written out below) for
keys, shapes and numbers; transformers' tokenizer loaded with AutoTokenizer and called as
Wan's HuggingfaceTokenizer calls it (padding="max_length", truncation=True, max_length 512,
add_special_tokens=True, the attention mask returned); Wan's code (wan/modules/t5.py,
tokenizers.py, model.py) for the names, the text clean-up and the cut-and-zero-pad, written
out here where needed.
"""

import dataclasses
import html
import json
import random

import pytest
import sentencepiece
import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from models import umt5
from models.keymaps import t5_keys, umt5_from_wan
from models.tokenizers import T5Tokenizer
from tests.test_text_encoders import assert_same_keys, shapes

# google/umt5-xxl config.json (= Wan's umt5_xxl(): vocab 256384, dim 4096, dim_attn 4096,
# dim_ffn 10240, 64 heads, 24 layers, 32 buckets; Wan's max_dist 128)
HF_UMT5_XXL = dict(
    vocab_size=256384,
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
    dropout_rate=0.1,
)


def hf_config(cfg: umt5.UMT5Config) -> UMT5Config:
    return UMT5Config(**dataclasses.asdict(cfg), feed_forward_proj="gated-gelu", dropout_rate=0.0)


# ---------------------------------------------------------------------------------------
# 1. Full size, on the meta device
# ---------------------------------------------------------------------------------------


def test_umt5_xxl_keys_and_shapes():
    """Key for key, shape for shape with transformers. transformers lists the tied token
    embedding twice (shared.weight, encoder.embed_tokens.weight: 243 keys); Wan's .pth and
    ours once: 242 keys, 5.68B parameters, as REFERENCE.md E."""
    assert dataclasses.asdict(umt5.PRESETS["umt5-xxl"]) == {
        k: HF_UMT5_XXL[k] for k in dataclasses.asdict(umt5.PRESETS["umt5-xxl"])
    }
    hf_cfg = UMT5Config(**HF_UMT5_XXL)
    assert hf_cfg.dense_act_fn == "gelu_new" and hf_cfg.is_gated_act  # gelu, tanh form
    with torch.device("meta"):
        hf = UMT5EncoderModel(hf_cfg)
        ours = umt5.UMT5Encoder(umt5.PRESETS["umt5-xxl"])
    hf_sd = hf.state_dict()
    assert len(hf_sd) == 243 and {"shared.weight", "encoder.embed_tokens.weight"} <= set(hf_sd)
    theirs = shapes(t5_keys(hf_sd))
    assert_same_keys(shapes(ours.state_dict()), theirs)
    assert len(theirs) == 242
    for i in range(24):  # a bias table in every block, not only block 0 as in T5
        bias = f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"
        assert theirs[bias] == (32, 64)
    assert sum(p.numel() for p in ours.parameters()) == 5_680_910_336
    assert list(ours.buffers()) == []


# ---------------------------------------------------------------------------------------
# 2. Wan's original names
# ---------------------------------------------------------------------------------------

# ours -> Wan (wan/modules/t5.py: T5Encoder.token_embedding / blocks / norm; T5SelfAttention
# .norm1, .attn.{q,k,v,o}, .norm2, .ffn.{gate.0, fc1, fc2}, .pos_embedding.embedding)
TO_WAN_BLOCK = {
    "layer.0.layer_norm": "norm1",
    "layer.0.SelfAttention.q": "attn.q",
    "layer.0.SelfAttention.k": "attn.k",
    "layer.0.SelfAttention.v": "attn.v",
    "layer.0.SelfAttention.o": "attn.o",
    "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "layer.1.layer_norm": "norm2",
    "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
    "layer.1.DenseReluDense.wi_1": "ffn.fc1",
    "layer.1.DenseReluDense.wo": "ffn.fc2",
}


def to_wan(sd: dict) -> dict:
    out = {}
    for name, t in sd.items():
        if name == "shared.weight":
            out["token_embedding.weight"] = t
        elif name == "encoder.final_layer_norm.weight":
            out["norm.weight"] = t
        else:
            _, _, n, rest = name.split(".", 3)  # encoder.block.N.<rest>
            module, leaf = rest.rsplit(".", 1)
            out[f"blocks.{n}.{TO_WAN_BLOCK[module]}.{leaf}"] = t
    return out


def test_wan_names_round_trip():
    with torch.device("meta"):
        ours = umt5.UMT5Encoder(umt5.PRESETS["umt5-xxl"])
    sd = ours.state_dict()
    wan = to_wan(sd)
    assert len(wan) == 242
    assert {k for k in wan if k.startswith("blocks.7.")} == {
        "blocks.7.norm1.weight",
        "blocks.7.attn.q.weight",
        "blocks.7.attn.k.weight",
        "blocks.7.attn.v.weight",
        "blocks.7.attn.o.weight",
        "blocks.7.pos_embedding.embedding.weight",
        "blocks.7.norm2.weight",
        "blocks.7.ffn.gate.0.weight",
        "blocks.7.ffn.fc1.weight",
        "blocks.7.ffn.fc2.weight",
    }
    assert wan["blocks.7.pos_embedding.embedding.weight"].shape == (32, 64)
    assert wan["blocks.7.ffn.gate.0.weight"].shape == (10240, 4096)
    back = umt5_from_wan(wan)
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)  # renamed, not copied
    # names the map does not know pass unchanged, for the strict loader to report
    odd = {"blocks.3.attn.extra.weight": 1, "pos_embedding.embedding.weight": 2, "x": 3}
    assert umt5_from_wan(odd) == odd


# ---------------------------------------------------------------------------------------
# 3. Tiny config, fp32, random weights: ours equals transformers, with padding masks
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = umt5.PRESETS["tiny"]
    torch.manual_seed(0)
    hf = UMT5EncoderModel._from_config(hf_config(cfg), attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # not ones
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:  # large, so a wrong bucket or table shows
                p.copy_(2 * torch.randn(p.shape, generator=g))
    with torch.device("meta"):
        ours = umt5.UMT5Encoder(cfg)
    ours.load_state_dict(t5_keys(hf.state_dict()), strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    return cfg, hf, ours.eval()


def padded_batch(cfg, L: int, lengths: list[int], seed: int):
    """Random ids, EOS (1) last, then pad (0); mask 1 on the tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (len(lengths), L), generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, n - 1], ids[b, n:], mask[b, :n] = 1, 0, 1
    return ids, mask


def test_tiny_parity_fp32(tiny):
    """fp32, max abs error <= 1e-5, every row (padding queries included), with masks of
    different lengths; L = 40 > max_distance 20: exact, log and clamped buckets."""
    cfg, hf, ours = tiny
    assert 40 > cfg.relative_attention_max_distance
    for L, lengths in ((40, [40, 23, 5, 1]), (7, [7, 3])):
        ids, mask = padded_batch(cfg, L, lengths, seed=L)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            out = ours(ids, mask)
            out_bool = ours(ids, mask.bool())
        err = (out - ref).abs().max().item()
        print(f"umT5 tiny fp32 L={L}: {err:.2e} (output scale {ref.abs().max().item():.2f})")
        assert out.shape == (len(lengths), L, cfg.d_model)
        assert err <= 1e-5
        assert torch.equal(out_bool, out)
    # no mask: everything attends everything, as transformers without a mask
    ids, _ = padded_batch(cfg, 40, [40, 9], seed=5)
    with torch.no_grad():
        err = (ours(ids) - hf(input_ids=ids).last_hidden_state).abs().max().item()
    print(f"umT5 tiny fp32 no mask: {err:.2e}")
    assert err <= 1e-5


def test_mask_hides_padding(tiny):
    """The tokens' rows do not depend on the padding ids (they do without the mask), and
    each block's own bias table counts."""
    cfg, _, ours = tiny
    ids, mask = padded_batch(cfg, 40, [12, 30], seed=7)
    other = ids.clone()
    other[0, 12:] = 5
    with torch.no_grad():
        a, b = ours(ids, mask), ours(other, mask)
        assert (a[0, :12] - b[0, :12]).abs().max().item() <= 1e-6
        assert not torch.allclose(ours(ids)[0, :12], ours(other)[0, :12], atol=1e-3)
        table = ours.encoder.block[2].layer[0].SelfAttention.relative_attention_bias.weight
        saved = table.clone()
        table.zero_()
        c = ours(ids, mask)
        table.copy_(saved)
    assert not torch.allclose(c, a, atol=1e-3)


def test_bf16_close_to_fp32(tiny):
    """bf16 weights and compute, with masks: finite, bf16, relative L2 error < 3e-2."""
    cfg, hf, ours = tiny
    with torch.device("meta"):
        ours16 = umt5.UMT5Encoder(cfg)
    sd = {k: v.to(torch.bfloat16) for k, v in t5_keys(hf.state_dict()).items()}
    ours16.load_state_dict(sd, strict=True, assign=True)
    ids, mask = padded_batch(cfg, 40, [40, 17], seed=9)
    with torch.no_grad():
        ref, out = ours(ids, mask), ours16(ids, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"umT5 tiny bf16 vs fp32: {err:.2e}")
    assert err < 3e-2


# ---------------------------------------------------------------------------------------
# 4. Text clean-up and tokenizer, as Wan does them
# ---------------------------------------------------------------------------------------

# fmt: off
HANDWRITTEN = [
    # empty and whitespace
    "", " ", "   ", "\t\n", "\u3000", "\u00a0", "\u2028", "\u0085", "\x0b\x0c", "\x1c\x1d",
    "a\x1cb", "\x1fa b\x1e", "  leading", "trailing  ", "many    spaces \t\n here",
    "a\u2003em\u2009thin\u202fspace\u205fmath",
    # HTML entities, once and twice escaped
    "&amp;", "&amp;amp;", "&lt;b&gt;bold&lt;/b&gt;", "&amp;lt;i&amp;gt;", "Tom &amp; Jerry",
    "&quot;quoted&quot; &#39;single&#39;", "&nbsp;nbsp&nbsp;", "&#x41;&#66;", "&notanentity;",
    "&amp;nbsp;", "a &lt;pad&gt; b", "&lt;/s&gt;",
    # special tokens written in the text
    "<pad>", "</s>", "<unk>", "a <pad> b", "x </s> y", "<extra_id_0>", "<extra_id_299>",
    "<extra_id_300>", "<pad><pad>",
    # unicode
    "Café naïve résumé", "cafe\u0301", "Ångström", "Ελληνικά", "Русский текст", "東京タワー",
    "日本語のテキスト", "中文字符测试", "한국어 텍스트", "ｶﾀｶﾅ", "emoji 😀🎉👍🏽", "👨‍👩‍👧‍👦",
    "مرحبا بالعالم", "שלום עולם", "ﬁ ligature", "fullwidth ＡＢＣ １２３", "½ ² ™ ©", "…—–",
    "▁", "a▁b", "zero\u200bwidth", "soft\u00adhyphen", "\ufeffbom", "\x00\x01 control",
    # prompts
    "A cat walks on the grass, realistic style.",
    "一只猫在草地上行走，写实风格。",
    "Bright tones, overexposed, static, blurred details, subtitles, worst quality",
    "cinematic photo, 8k, ultra detailed, (masterpiece:1.2), [best quality]",
]
# fmt: on

WORDS = (
    "the a photo of cat dog red sky Tokyo 東京 café naïve ultra detailed 4k !! ... "
    "&amp; &lt; <pad> </s> lion sunset don't"
).split()
CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789  \t\n.,!?'\"-()&;:#<>"
    "éüößçñÅ東京タワ日本😀👍مرحשל\u0301\u00a0\u3000\x1cﬁ＿"
)


def texts() -> list[str]:
    rng = random.Random(4321)
    out = list(HANDWRITTEN)
    out += ["".join(rng.choice(CHARS) for _ in range(rng.randint(1, 40))) for _ in range(90)]
    out += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(50)]
    # well past 512 tokens: truncation, EOS kept last, no padding
    out += [" ".join(rng.choice(WORDS) for _ in range(800)) for _ in range(3)]
    out += ["word " * 700, "x" * 3000, "東京" * 800, "&amp;" * 600, "a" + " " * 5000 + "b"]
    return out


TEXTS = texts()


def test_enough_texts():
    assert len(TEXTS) >= 200 and len(set(TEXTS)) == len(TEXTS)


def wan_clean(text: str) -> str:
    """wan/modules/tokenizers.py: whitespace_clean(basic_clean(text)), ftfy left out."""
    regex = pytest.importorskip("regex")  # Wan's `\s` is the regex module's
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def test_clean_text_is_wans(monkeypatch):
    monkeypatch.setattr(umt5, "ftfy", None)
    every_space = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
    for text in TEXTS + [f"a{every_space}b{every_space}", every_space + "x"]:
        assert umt5.clean_text(text) == wan_clean(text), repr(text)
    assert umt5.clean_text("  &amp;lt;b&amp;gt;  x\t\n y ") == "<b> x y"  # unescaped twice
    assert umt5.clean_text("a\x1cb") == "a\x1cb"  # not Unicode whitespace: kept inside
    # ftfy, when installed, runs first: its output is what gets unescaped
    calls = []

    class FakeFtfy:
        @staticmethod
        def fix_text(text):
            calls.append(text)
            return text.replace("X", "&amp;")

    monkeypatch.setattr(umt5, "ftfy", FakeFtfy)
    assert umt5.clean_text(" aXlt; ") == "a<"
    assert calls == [" aXlt; "]


@pytest.fixture(scope="module")
def umt5_folder(tmp_path_factory):
    """An umT5-like tokenizer folder: a sentencepiece unigram model (pad 0, eos 1, unk 2, no
    bos, byte fallback, nmt_nfkc) and a tokenizer_config.json naming T5Tokenizer with 300
    sentinels (as umT5's; its spiece.model has no sentinels of its own)."""
    pytest.importorskip("google.protobuf", reason="transformers reads spiece.model with protobuf")
    folder = tmp_path_factory.mktemp("umt5")
    rng = random.Random(2)
    syllables = "ka to ri ne sun mo la pe qu ix zor ben ch th ing ed er a e o ph st".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    words += "the a photo of cat dog Café naïve 東京 タワー 123 !? , . ( ) & ; : - ' 😀".split()
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(folder / "spiece"),
        model_type="unigram",
        vocab_size=600,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 300, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_tokenizer_matches_transformers(umt5_folder):
    """ids and attention mask of ours (T5Tokenizer + umt5.tokenize) equal transformers'
    tokenizer called as Wan calls it, on the cleaned texts, for every text."""
    ref = AutoTokenizer.from_pretrained(str(umt5_folder))
    assert type(ref).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    ours = T5Tokenizer.from_folder(umt5_folder)
    assert (
        len(ours)
        == len(ref)
        == sentencepiece.SentencePieceProcessor(
            model_file=str(umt5_folder / "spiece.model")
        ).get_piece_size()
        + 300
    )
    cleaned = [umt5.clean_text(t) for t in TEXTS]
    want = ref(
        cleaned,
        padding="max_length",
        truncation=True,
        max_length=512,
        add_special_tokens=True,
        return_tensors="pt",
    )
    ids, mask = umt5.tokenize(ours, TEXTS)
    assert ids.shape == mask.shape == want.input_ids.shape == (len(TEXTS), 512)
    assert mask.dtype == torch.bool
    for i, text in enumerate(TEXTS):
        if not torch.equal(ids[i], want.input_ids[i]):
            pytest.fail(
                f"ids differ for text {i} {text[:60]!r}:\n  ours: {ids[i].tolist()[:20]}\n"
                f"  transformers: {want.input_ids[i].tolist()[:20]}"
            )
        if not torch.equal(mask[i].long(), want.attention_mask[i]):
            pytest.fail(f"mask differs for text {i} {text[:60]!r}")
    # the cases that a mask of `ids != pad` would get wrong are there, and right
    assert ((ids == ours.pad_id) & mask).any(dim=1).sum() >= 3
    assert mask.all(dim=1).sum() >= 5 and (mask.sum(dim=1) == 1).sum() >= 5


# ---------------------------------------------------------------------------------------
# 5. encode_prompts: cut to the true length, zero-padded back
# ---------------------------------------------------------------------------------------


def test_encode_prompts(tiny, umt5_folder):
    """Rows past each prompt's token count are exactly zero; the rows before it are exactly
    the encoder's masked output (and within 1e-5 of transformers', fp32), as Wan's
    `[u[:v] for u, v in zip(context, seq_lens)]` then zero-padding to text_len."""
    cfg, hf, ours = tiny
    L = 64
    tok = T5Tokenizer.from_folder(umt5_folder, max_length=L)
    assert len(tok) <= cfg.vocab_size
    prompts = ["", "a photo of a cat", "<pad> dog &amp;amp; cat", "word " * 100, "東京 タワー"]
    with torch.no_grad():
        out = umt5.encode_prompts(tok, ours, prompts, length=L)
        ids, mask = umt5.tokenize(tok, prompts)
        full = ours(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert out.shape == (len(prompts), L, cfg.d_model) and out.dtype == torch.float32
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] == 1 and lengths[3] == L and len(set(lengths)) == len(lengths)
    wan = torch.stack(
        [torch.cat([u[:n], u.new_zeros(L - n, u.shape[1])]) for u, n in zip(full, lengths)]
    )
    assert torch.equal(out, wan)
    for b, n in enumerate(lengths):
        assert torch.count_nonzero(out[b, n:]) == 0
        assert torch.equal(out[b, :n], full[b, :n])
        if n < L:  # the encoder's own padding rows are not zero: the zeros are the cut's
            assert (full[b, n:] != 0).any()
    err = (out - ref.masked_fill(~mask[..., None], 0)).abs().max().item()
    print(f"encode_prompts vs transformers (fp32): {err:.2e}")
    assert err <= 1e-5
    with torch.no_grad():  # one prompt alone: the same rows (to rounding: other batch shapes)
        one = umt5.encode_prompts(tok, ours, "a photo of a cat", length=L)
    assert one.shape == (1, L, cfg.d_model) and torch.count_nonzero(one[0, lengths[1] :]) == 0
    assert (one - out[1:2]).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="max_length=512"):
        umt5.encode_prompts(tok, ours, prompts)  # length 512, tokenizer 64
