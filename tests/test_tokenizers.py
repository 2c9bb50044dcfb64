"""models/tokenizers.py against transformers' tokenizers built from the same files.

Both vocabularies are trained here in about a second: a CLIP-style byte-level BPE
(`tokenizers` BpeTrainer, CLIP's normaliser and pre-tokeniser, `</w>` suffix, the special
tokens moved to the end of vocab.json as in CLIP-L) and a T5-style sentencepiece unigram
(pad 0, eos 1, unk 2, no bos, nmt_nfkc normalisation). Every id of every text must match
transformers called as the FLUX pipeline calls it: padding="max_length", truncation=True.

The oracle is transformers 5 (CLIPTokenizerFast and T5TokenizerFast are aliases of
CLIPTokenizer / T5Tokenizer there, both backed by `tokenizers`; ftfy is not used by
transformers 5 at all, installed or not). transformers needs protobuf to read a
sentencepiece model: without it the T5 comparisons skip, and only the comparison with the
sentencepiece library on ordinary text runs.
"""

import json
import random
import shutil

import pytest
import sentencepiece
import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from models.tokenizers import CLIP_PATTERN, CLIPTokenizer, T5Tokenizer

transformers = pytest.importorskip("transformers")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ---------------------------------------------------------------------------------------
# the texts
# ---------------------------------------------------------------------------------------

# fmt: off
HANDWRITTEN = [
    # empty and whitespace only
    "", " ", "   ", "\t", "\n", " \t\n\r ", "\u3000", "\u00a0", "\u2028", "\u0085", "\x0b\x0c",
    # case
    "a", "A", "Hello World", "hello world", "HELLO WORLD", "HeLLo WoRLD", "A Photo Of A Cat",
    # whitespace inside
    "  leading", "trailing  ", "  both  ", "multiple    spaces   here", "tabs\tand\t\ttabs",
    "new\nlines\n\nhere", "mixed \t\n  ws", "crlf\r\nline", "a\u2003em\u2009thin\u202fspace",
    # accents and combining marks
    "Café naïve résumé", "cafe\u0301 nai\u0308ve", "Ångström", "ÉCOLE ÉLÈVE", "e\u0301\u0301\u0301",
    "\u0301 leading combining", "a\u0301\u0301 b", "Z\u0351\u0352\u0353algo", "ǅ titlecase",
    "İstanbul", "ẞ ß straße", "Ελληνικά", "Русский текст",
    # CJK
    "東京タワー", "東京 タワー", "日本語のテキスト", "中文字符测试", "한국어 텍스트", "ｶﾀｶﾅ",
    # emoji
    "emoji 😀🎉👍🏽", "👨‍👩‍👧‍👦 family", "🇯🇵 flag", "❤️ heart",
    # right to left
    "مرحبا بالعالم", "שלום עולם", "mixed العربية and English", "\u202eRTL override\u202c",
    # compatibility forms, symbols, punctuation
    "ﬁ ligature ﬀ ﬃ", "fullwidth ＡＢＣ １２３", "½ ⅓ ² ³", "™ © ®", "…", "—–-",
    "“quotes” ‘single’", "hello!!! what??? ...", "(parens) [brackets] {braces}", "a,b;c:d",
    "a/b\\c|d", "~`^", "_underscore_", "#hashtag", "@mention", "x=1+2*3/4", "100%", "$9.99",
    # digits
    "12345", "3.14159", "1,000,000", "2024-01-01", "8k 4K 1080p",
    # contractions
    "don't can't won't", "it's we're they've I'm you'll he'd", "IT'S DON'T", "rock'n'roll",
    # HTML entities and markup
    "&amp; &lt; &gt; &quot; &#39;", "&nbsp;non&nbsp;breaking", "Tom &amp; Jerry", "<b>bold</b>",
    # special tokens written in the text
    BOS, EOS, f"a {EOS} b", "<|ENDOFTEXT|>", "<|StartOfText|> x", "</w>", "word</w>",
    "<pad>", "</s>", "<unk>", "<extra_id_0>", "x <extra_id_5> y", "<extra_id_99>end",
    "<extra_id_0><extra_id_1>", "<extra_id_100>", "＜extra_id_5＞", "<EXTRA_ID_1>",
    # sentencepiece's own symbols, control characters, invisibles
    "▁", "▁▁x", "a▁b", "\x00\x01 control", "zero\u200bwidth", "soft\u00adhyphen", "\ufeffbom",
    # prompts
    "the quick brown fox jumps over the lazy dog",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "cinematic photo, 8k, ultra detailed, (masterpiece:1.2), [best quality]",
    "A majestic lion standing on a cliff at sunset, golden hour, highly detailed fur",
]
# fmt: on

WORDS = (
    "the a photo of cat dog red blue sky Tokyo 東京 café naïve ultra detailed 4k 8K !! ... "
    "lion sunset portrait (masterpiece) HDR don't it's"
).split()
CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789  \t\n.,!?'\"-()&;:#"
    "éèüößçñÅ東京タワ日本😀👍مرحبשל\u0301\u00a0ﬁ＿"
)


def texts() -> list[str]:
    rng = random.Random(1234)
    out = list(HANDWRITTEN)
    out += ["".join(rng.choice(CHARS) for _ in range(rng.randint(1, 40))) for _ in range(80)]
    out += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(40)]
    # well past 77 and 512 tokens: truncation
    out += [" ".join(rng.choice(WORDS) for _ in range(700)) for _ in range(3)]
    out += [
        "word " * 700,
        "x" * 3000,
        "東京" * 800,
        "😀" * 400,
        "a" + " " * 5000 + "b",
        "Hello, World! " * 200,
        "\n".join(["line"] * 900),
        "1234567890" * 100,
        "&amp;" * 300,
    ]
    return out


TEXTS = texts()


def test_enough_texts():
    assert len(TEXTS) >= 200
    assert len(set(TEXTS)) == len(TEXTS)


def assert_same_ids(ours: torch.Tensor, ref, texts: list[str], length: int):
    ref = torch.as_tensor(ref)
    assert ours.dtype == torch.long
    assert ours.shape == ref.shape == (len(texts), length)
    for i, text in enumerate(texts):
        if not torch.equal(ours[i], ref[i]):
            pytest.fail(
                f"ids differ for text {i} {text[:80]!r}:\n"
                f"  ours:         {ours[i].tolist()[:24]}\n"
                f"  transformers: {ref[i].tolist()[:24]}"
            )


def hf_ids(tok, texts, length):
    out = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out["input_ids"]


# ---------------------------------------------------------------------------------------
# the files
# ---------------------------------------------------------------------------------------

SYLLABLES = "ka to ri ne sun mo la pe qu ix zor ben ch th ing ed er a e o ph st".split()


def corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    words += (
        "the quick brown fox jumps over lazy dog photo of a cat Café naïve résumé 東京 タワー "
        "123 456 !? , . ( ) & ; : - ' \" don't it's 😀 Ελληνικά"
    ).split()
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """{"files": vocab.json + merges.txt, "json": tokenizer.json, "config": files + config}."""
    root = tmp_path_factory.mktemp("clip")
    tok = Tokenizer(BPE(end_of_word_suffix="</w>", unk_token=EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(0), trainer)

    files = root / "files"
    files.mkdir()
    tok.model.save(str(files))  # vocab.json, merges.txt (with its "#version" header)
    # CLIP-L keeps the special tokens last (49406, 49407): do the same
    vocab = json.loads((files / "vocab.json").read_text())
    order = sorted((i, t) for t, i in vocab.items() if t not in (BOS, EOS))
    vocab = {t: n for n, (_, t) in enumerate(order)}
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    (files / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    assert (files / "merges.txt").read_text().startswith("#version")

    # tokenizer.json as transformers writes it
    saved = root / "saved"
    transformers.CLIPTokenizer.from_pretrained(str(files)).save_pretrained(str(saved))
    only_json = root / "json"
    only_json.mkdir()
    shutil.copy(saved / "tokenizer.json", only_json / "tokenizer.json")

    # FLUX.1's tokenizer/tokenizer_config.json flags: <|startoftext|> is matched on the
    # normalised (lower-cased) text, <|endoftext|> on the raw text
    config = root / "config"
    shutil.copytree(files, config)
    flags = dict(lstrip=False, rstrip=False, single_word=False, special=True)
    decoder = {
        str(vocab[BOS]): {"content": BOS, "normalized": True, **flags},
        str(vocab[EOS]): {"content": EOS, "normalized": False, **flags},
    }
    cfg = {"added_tokens_decoder": decoder, "bos_token": BOS, "eos_token": EOS}
    cfg |= {"pad_token": EOS, "unk_token": EOS, "model_max_length": 77}
    cfg |= {"tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    (config / "tokenizer_config.json").write_text(json.dumps(cfg))
    (config / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS})
    )
    return {"files": files, "json": only_json, "config": config, "vocab": vocab}


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    """{"plain": T5-like spiece.model, "symbols": one with a user-defined and a control
    symbol, "extra3": spiece.model + tokenizer_config.json with extra_ids 3}."""
    root = tmp_path_factory.mktemp("t5")
    dirs = {}
    for name, extra in [("plain", {}), ("symbols", {"user_defined_symbols": ["<sep>"]})]:
        (root / name).mkdir()
        if extra:
            extra["control_symbols"] = ["<ctl>"]
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus(1)),
            model_prefix=str(root / name / "spiece"),
            model_type="unigram",
            vocab_size=400,
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=1,
            minloglevel=2,
            **extra,
        )
        (root / name / "spiece.vocab").unlink()
        dirs[name] = root / name
    dirs["extra3"] = root / "extra3"
    dirs["extra3"].mkdir()
    shutil.copy(dirs["plain"] / "spiece.model", dirs["extra3"] / "spiece.model")
    (dirs["extra3"] / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 3}))
    return dirs


def need_protobuf():
    pytest.importorskip("google.protobuf", reason="transformers reads spiece.model with protobuf")


# ---------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["from_files", "from_json", "from_folder:files", "from_folder:json"]
)
def test_clip_matches_transformers(clip_dirs, how):
    files, only_json = clip_dirs["files"], clip_dirs["json"]
    ours = {
        "from_files": lambda: CLIPTokenizer.from_files(files / "vocab.json", files / "merges.txt"),
        "from_json": lambda: CLIPTokenizer.from_json(only_json / "tokenizer.json"),
        "from_folder:files": lambda: CLIPTokenizer.from_folder(files),
        "from_folder:json": lambda: CLIPTokenizer.from_folder(only_json),
    }[how]()
    ref = transformers.CLIPTokenizerFast.from_pretrained(str(files))
    assert_same_ids(ours(TEXTS), hf_ids(ref, TEXTS, 77), TEXTS, 77)
    if how.endswith("json"):
        ref_json = transformers.CLIPTokenizerFast.from_pretrained(str(only_json))
        assert_same_ids(ours(TEXTS), hf_ids(ref_json, TEXTS, 77), TEXTS, 77)


def test_clip_config_flags_match_transformers(clip_dirs):
    ours = CLIPTokenizer.from_folder(clip_dirs["config"])
    ref = transformers.CLIPTokenizerFast.from_pretrained(str(clip_dirs["config"]))
    assert_same_ids(ours(TEXTS), hf_ids(ref, TEXTS, 77), TEXTS, 77)
    # <|startoftext|> is normalized=True there: upper case still reads as the token
    bos = clip_dirs["vocab"][BOS]
    assert ours("<|STARTOFTEXT|>")[0, :2].tolist() == [bos, bos]


def test_clip_special_ids_and_layout(clip_dirs):
    vocab = clip_dirs["vocab"]
    tok = CLIPTokenizer.from_folder(clip_dirs["files"])
    bos, eos = vocab[BOS], vocab[EOS]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eos, eos) == (len(vocab) - 2, bos + 1, eos)
    ids = tok(["", "a photo", "word " * 200])
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert ids[0].tolist() == [bos] + [eos] * 76
    assert ids[:, 0].eq(bos).all()
    assert ids[2, -1] == eos and (ids[2, 1:-1] != eos).all()  # truncated: EOS kept last
    assert torch.equal(tok("a photo"), ids[1:2])
    assert torch.equal(tok(("a photo",)), ids[1:2])
    assert tok([]).shape == (0, 77)
    # lower-casing and whitespace clean-up
    assert torch.equal(tok("  A \t PHOTO\n"), tok("a photo"))


def test_clip_max_length(clip_dirs):
    tok = CLIPTokenizer.from_folder(clip_dirs["files"], max_length=8)
    ref = transformers.CLIPTokenizerFast.from_pretrained(str(clip_dirs["files"]))
    assert_same_ids(tok(TEXTS), hf_ids(ref, TEXTS, 8), TEXTS, 8)


# ---------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain", "symbols", "extra3"])
@pytest.mark.parametrize("length", [512, 256])
def test_t5_matches_transformers(t5_dirs, name, length):
    need_protobuf()
    folder = t5_dirs[name]
    ours = T5Tokenizer.from_folder(folder, max_length=length)
    ref = transformers.T5TokenizerFast.from_pretrained(str(folder))
    assert len(ours) == len(ref)
    assert_same_ids(ours(TEXTS), hf_ids(ref, TEXTS, length), TEXTS, length)


@pytest.mark.parametrize("name", ["plain", "symbols"])
def test_t5_tokenizer_json_matches_transformers(t5_dirs, tmp_path, name):
    """tokenizer.json (as transformers writes it; FLUX's tokenizer_2 ships one too)."""
    need_protobuf()
    transformers.T5TokenizerFast.from_pretrained(str(t5_dirs[name])).save_pretrained(tmp_path / "s")
    only_json = tmp_path / "json"
    only_json.mkdir()
    shutil.copy(tmp_path / "s" / "tokenizer.json", only_json / "tokenizer.json")
    ref = transformers.T5TokenizerFast.from_pretrained(str(only_json))
    want = hf_ids(ref, TEXTS, 512)
    assert_same_ids(T5Tokenizer.from_folder(only_json)(TEXTS), want, TEXTS, 512)
    assert_same_ids(T5Tokenizer.from_json(only_json / "tokenizer.json")(TEXTS), want, TEXTS, 512)
    # and the same ids as from spiece.model
    assert_same_ids(T5Tokenizer.from_folder(t5_dirs[name])(TEXTS), want, TEXTS, 512)


def test_t5_layout(t5_dirs):
    tok = T5Tokenizer.from_folder(t5_dirs["plain"])
    assert tok.max_length == 512
    sp = sentencepiece.SentencePieceProcessor(model_file=str(t5_dirs["plain"] / "spiece.model"))
    n = sp.get_piece_size()
    assert (tok.eos_id, tok.pad_id, len(tok)) == (1, 0, n + 100)
    # sentinels after the pieces, reversed (T5: <extra_id_0> = 32099)
    assert tok.backend.token_to_id("<extra_id_0>") == n + 99
    assert tok.backend.token_to_id("<extra_id_99>") == n
    ids = tok(["", "a photo", "word " * 700, "<extra_id_0>"])
    assert ids.shape == (4, 512)
    assert ids[0].tolist() == [1] + [0] * 511
    assert ids[2, -1] == 1 and (ids[2, :-1] > 2).all()  # truncated: EOS kept last
    assert ids[3, :3].tolist() == [n + 99, 1, 0]
    short = T5Tokenizer.from_folder(t5_dirs["plain"], max_length=256)
    assert short(["word " * 700]).shape == (1, 256)
    assert T5Tokenizer.from_folder(t5_dirs["extra3"]).backend.token_to_id("<extra_id_3>") is None


def test_t5_pieces_read_like_sentencepiece(t5_dirs):
    """The protobuf reading of spiece.model gives sentencepiece's own pieces and scores."""
    path = t5_dirs["symbols"] / "spiece.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    vocab = T5Tokenizer.from_file(path).backend.get_vocab()
    for i in range(sp.get_piece_size()):
        assert vocab[sp.id_to_piece(i)] == i
    from models.tokenizers import _read_spm

    pieces, types, unk_id, charsmap = _read_spm(path)
    assert [p for p, _ in pieces] == [sp.id_to_piece(i) for i in range(len(pieces))]
    assert [s for _, s in pieces] == [sp.get_score(i) for i in range(len(pieces))]
    assert [i for i, t in enumerate(types) if t == 3] == [0, 1, sp.piece_to_id("<ctl>")]
    assert types[sp.piece_to_id("<sep>")] == 4 and unk_id == 2 and charsmap


ORDINARY = [t for t in TEXTS if t.isascii() and "<" not in t] + [
    "Café naïve résumé",
    "東京 タワー",
    "fullwidth ＡＢＣ １２３",
    "ﬁ ligature",
]


def test_t5_matches_sentencepiece_on_ordinary_text(t5_dirs):
    """No protobuf needed: on ordinary text the ids are sentencepiece's, plus EOS and pad."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(t5_dirs["plain"] / "spiece.model"))
    want = [(sp.encode(t)[:511] + [1] + [0] * 512)[:512] for t in ORDINARY]
    tok = T5Tokenizer.from_folder(t5_dirs["plain"])
    assert_same_ids(tok(ORDINARY), want, ORDINARY, 512)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="spiece.model or tokenizer.json"):
        T5Tokenizer.from_folder(tmp_path)


def test_wrong_model_in_json(tmp_path, clip_dirs):
    with pytest.raises(ValueError, match="Unigram"):
        T5Tokenizer.from_json(clip_dirs["json"] / "tokenizer.json")


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok", 3], [None], {"a": 1}])
def test_non_string_input_is_type_error(clip_dirs, t5_dirs, bad):
    for tok in (
        CLIPTokenizer.from_folder(clip_dirs["files"]),
        T5Tokenizer.from_folder(t5_dirs["plain"]),
    ):
        with pytest.raises(TypeError):
            tok(bad)
