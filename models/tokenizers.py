"""Tokenizers for the text encoders: CLIP-L (byte-level BPE) and T5 / umT5 (sentencepiece).

Both return what the FLUX and Wan pipelines feed their text encoders: a LongTensor
(B, max_length), truncated and padded to max_length, with no attention mask (FLUX encodes
the padding too, REFERENCE.md section C).

The behaviour matched, id for id, is transformers 5's `CLIPTokenizer` / `T5Tokenizer`
called with padding="max_length", truncation=True (tests/test_tokenizers.py checks it on
trained vocabularies). Both are built here from `tokenizers` parts; transformers is not
imported.

CLIP, per input text:
  1. special tokens written in the text (`<|startoftext|>`, `<|endoftext|>`) become their
     ids, matched on the raw text;
  2. normalise: NFC, every run of whitespace -> one space, lower case;
  3. split with CLIP's pattern (the special tokens, contractions 's 't 're 've 'm 'll 'd,
     runs of letters, single digits, runs of other non-space characters); whitespace is
     dropped here, which is what strips the text;
  4. map bytes to printable characters (GPT-2 byte level) and run BPE on each piece with
     `</w>` marking its end; a piece BPE cannot cover becomes the unk token, one per symbol;
  5. [BOS] ids [EOS], truncating the ids so that EOS stays the last of max_length, then
     padding with the pad token (EOS in CLIP-L).
  No ftfy and no HTML unescaping: transformers 5 has neither ("&amp;" stays "&amp;").
  The original OpenAI CLIP (ftfy.fix_text, html.unescape twice) and transformers 4's slow
  CLIPTokenizer (ftfy when installed, else BERT's BasicTokenizer, which also puts spaces
  around CJK characters) differ from this on such texts; transformers 4's fast tokenizer
  does not.

T5, per input text:
  1. special tokens in the text (`<pad>`, `</s>`, `<unk>`, `<extra_id_N>`, and any control
     or user-defined piece of the sentencepiece model) become their ids, matched on the
     raw text;
  2. normalise with the model's own precompiled character map (NFKC-like for T5);
  3. split on whitespace, prefix every word with "▁" (so leading, trailing and repeated
     whitespace vanish, and text after a special token starts a new word: transformers'
     `legacy=True` behaviour, the only one transformers 5 has);
  4. unigram segmentation (Viterbi over the piece scores), unknown runs fused into one unk;
  5. ids + [EOS], truncating so that EOS stays last, padded with `<pad>` (id 0).
  `<extra_id_0>` ... `<extra_id_{n-1}>` follow the sentencepiece pieces in reverse order
  (T5: <extra_id_0> = 32099), as transformers lays them out.
  This is the unigram of `tokenizers`, not the sentencepiece library's own encoder; the two
  agree on ordinary text but not always on rare input (a base letter with two or more
  combining marks, U+0085 as whitespace).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Sequence

import sentencepiece
import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

__all__ = ["CLIPTokenizer", "T5Tokenizer"]

# CLIP's pre-tokenisation pattern (OpenAI CLIP simple_tokenizer, as lower-cased text sees it)
CLIP_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


# ---------------------------------------------------------------------------------------
# shared: input checks, batching, the files of a tokenizer folder
# ---------------------------------------------------------------------------------------


class _TextTokenizer:
    """A `tokenizers.Tokenizer` set to truncate and pad every text to `max_length` ids."""

    def __init__(self, backend: Tokenizer, max_length: int, pad_token: str):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.backend = backend
        self.max_length = max_length
        self.pad_token = pad_token
        self.pad_id = self._id(pad_token)
        backend.enable_truncation(max_length)
        backend.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)

    def _id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (B, max_length) of a text or a list of texts."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise TypeError(f"expected a str or a list of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}, expected str")
        if not texts:
            return torch.empty((0, self.max_length), dtype=torch.long)
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=True)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def count(self, text: str) -> int:
        """How many ids the text has, special tokens included, before it is cut to
        max_length (so a caller can say that a prompt was cut)."""
        if getattr(self, "_uncut", None) is None:
            self._uncut = Tokenizer.from_str(self.backend.to_str())
            self._uncut.no_truncation()
            self._uncut.no_padding()
        return len(self._uncut.encode(text, add_special_tokens=True).ids)

    def __len__(self) -> int:
        """Vocabulary size, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)


def _require(folder: str, *names: str) -> list[str] | None:
    """Paths of `names` in `folder`, or None when one of them is missing."""
    paths = [os.path.join(folder, n) for n in names]
    return paths if all(os.path.isfile(p) for p in paths) else None


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_config(folder: str) -> tuple[dict, dict[str, AddedToken]]:
    """transformers' side files of a tokenizer folder, when present.

    Returns (settings, flags): settings holds bos/eos/pad/unk token strings and the rest of
    tokenizer_config.json; flags maps a token string to the AddedToken that
    `added_tokens_decoder` describes (lstrip, rstrip, normalized, ...).
    """
    settings: dict = {}
    flags: dict[str, AddedToken] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for key, value in data.items():
            if key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                if _token_content(value) is not None:
                    settings[key] = _token_content(value)
            elif key == "added_tokens_decoder":
                for entry in value.values():
                    flags[entry["content"]] = _added_token(entry)
            else:
                settings[key] = value
    return settings, flags


def _added_token(entry: dict) -> AddedToken:
    return AddedToken(
        entry["content"],
        single_word=entry.get("single_word", False),
        lstrip=entry.get("lstrip", False),
        rstrip=entry.get("rstrip", False),
        normalized=entry.get("normalized", not entry.get("special", True)),
        special=entry.get("special", True),
    )


def _add_specials(backend: Tokenizer, tokens: list[str], flags: dict[str, AddedToken]) -> None:
    """Make `tokens` special (split out of the raw text before anything else), in order.

    A token already in the vocabulary keeps its id; a new one gets the next free id.
    """
    added, seen = [], set()
    for t in tokens:
        if t not in seen:
            seen.add(t)
            added.append(flags.get(t) or AddedToken(t, special=True, normalized=False))
    backend.add_special_tokens(added)


# ---------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------


class CLIPTokenizer(_TextTokenizer):
    """CLIP's byte-level BPE tokenizer (CLIP-L in FLUX's `tokenizer/` folder).

    vocab: token -> id (vocab.json); merges: BPE merge pairs in rank order (merges.txt).
    Special tokens are named, and their ids read from the vocabulary; pad and unk default
    to the EOS token as in CLIP-L. `added_tokens` optionally gives the AddedToken flags of
    a special token (tokenizer_config.json's `added_tokens_decoder`).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        max_length: int = 77,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str | None = None,
        unk_token: str | None = None,
        added_tokens: dict[str, AddedToken] | None = None,
    ):
        pad_token = pad_token or eos_token
        unk_token = unk_token or eos_token
        backend = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                unk_token=unk_token,
                fuse_unk=False,
            )
        )
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # keep the pattern's matches, drop what lies between them (whitespace)
                pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        _add_specials(backend, [bos_token, eos_token, pad_token, unk_token], added_tokens or {})
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token)
        self.eos_id = backend.token_to_id(eos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=[bos_token, "$A", eos_token],
            special_tokens=[(bos_token, self.bos_id), (eos_token, self.eos_id)],
        )
        super().__init__(backend, max_length, pad_token)

    @classmethod
    def from_files(cls, vocab: str, merges: str, **kwargs) -> CLIPTokenizer:
        """From vocab.json and merges.txt (its "#version" header line is skipped)."""
        vocab_dict, merge_list = BPE.read_file(str(vocab), str(merges))
        return cls(vocab_dict, merge_list, **kwargs)

    @classmethod
    def from_json(cls, path: str, **kwargs) -> CLIPTokenizer:
        """From a `tokenizers` tokenizer.json holding a BPE model.

        Only the vocabulary, the merges and the added tokens' flags are taken from the file
        (flags given in `added_tokens` win); the rest of the pipeline is CLIP's, as in
        transformers.
        """
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model") or {}
        if model.get("type") not in ("BPE", None) or "merges" not in model:
            raise ValueError(f"{path}: expected a BPE model, found {model.get('type')!r}")
        merges = [
            tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]
        ]
        flags = {t["content"]: _added_token(t) for t in data.get("added_tokens") or []}
        kwargs["added_tokens"] = {**flags, **(kwargs.get("added_tokens") or {})}
        return cls(model["vocab"], merges, **kwargs)

    @classmethod
    def from_folder(cls, folder: str, **kwargs) -> CLIPTokenizer:
        """From a tokenizer folder (diffusers snapshot `tokenizer/`).

        Takes tokenizer.json when present (as transformers does), else vocab.json +
        merges.txt; special token names and flags come from tokenizer_config.json /
        special_tokens_map.json when present. Keyword arguments override them.
        """
        folder = str(folder)
        settings, flags = _read_config(folder)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if key in settings:
                kwargs.setdefault(key, settings[key])
        json_path = _require(folder, "tokenizer.json")
        files = _require(folder, "vocab.json", "merges.txt")
        kwargs.setdefault("added_tokens", flags)
        if json_path:
            return cls.from_json(json_path[0], **kwargs)
        if files:
            return cls.from_files(*files, **kwargs)
        raise FileNotFoundError(
            f"no CLIP tokenizer in {folder}: looked for tokenizer.json, or vocab.json and "
            "merges.txt"
        )


# ---------------------------------------------------------------------------------------
# T5 / umT5
# ---------------------------------------------------------------------------------------

# sentencepiece piece types (sentencepiece_model.proto)
_SPM_NORMAL, _SPM_CONTROL, _SPM_USER_DEFINED = 1, 3, 4


def _proto_fields(data: bytes):
    """(field number, value) of each field of one protobuf message, in file order.

    Just enough of the wire format for a sentencepiece model: varints, 32/64-bit values
    and length-delimited bytes (strings and sub-messages).
    """

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = data[i]
            value |= (b & 0x7F) << shift
            i += 1
            if b < 0x80:
                return value, i
            shift += 7

    i = 0
    while i < len(data):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 2:
            n, i = varint(i)
            value, i = data[i : i + n], i + n
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field})")
        yield field, value


def _read_spm(path: str) -> tuple[list[tuple[str, float]], list[int], int, bytes | None]:
    """Pieces (piece, score), piece types, unk id and precompiled charsmap of a .model file.

    sentencepiece loads and checks the file; the piece types and the normaliser's charsmap,
    which its Python API does not expose, are read from the serialized ModelProto
    (pieces = 1 {piece = 1, score = 2, type = 3}, normalizer_spec = 3 {charsmap = 2}).
    """
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    pieces, types, charsmap = [], [], None
    for field, value in _proto_fields(sp.serialized_model_proto()):
        if field == 1:
            piece, score, kind = "", 0.0, _SPM_NORMAL
            for f, v in _proto_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            pieces.append((piece, score))
            types.append(kind)
        elif field == 3:
            for f, v in _proto_fields(value):
                if f == 2:
                    charsmap = bytes(v) or None
    if len(pieces) != sp.get_piece_size():
        raise ValueError(
            f"{path}: read {len(pieces)} pieces, sentencepiece has {sp.get_piece_size()}"
        )
    return pieces, types, sp.unk_id(), charsmap


class T5Tokenizer(_TextTokenizer):
    """T5 / umT5 sentencepiece unigram tokenizer (FLUX's `tokenizer_2/`, Wan's umT5).

    vocab: (piece, score) in id order, the `<extra_id_N>` sentinels included when the files
    have them; unk_id: the unk piece's id; charsmap: the sentencepiece normaliser's
    precompiled character map (None: no normalisation). Sentinels missing from `vocab`
    are added after it, `<extra_id_0>` first. `special` names further pieces to split out
    of the raw text (the model's control and user-defined pieces), with their flags.
    max_length: 512 for flux-dev, 256 for flux-schnell, 512 for Wan.
    """

    def __init__(
        self,
        vocab: list[tuple[str, float]],
        *,
        unk_id: int = 2,
        charsmap: bytes | None = None,
        max_length: int = 512,
        extra_ids: int = 100,
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        special: list[AddedToken] | None = None,
        added_tokens: dict[str, AddedToken] | None = None,
    ):
        backend = Tokenizer(Unigram([tuple(v) for v in vocab], unk_id=unk_id, byte_fallback=False))
        if charsmap:
            backend.normalizer = normalizers.Precompiled(charsmap)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            ]
        )
        flags = dict(added_tokens or {})
        for tok in special or []:
            flags.setdefault(tok.content, tok)
        names = [eos_token, unk_token, pad_token] + [t.content for t in special or []]
        names += [f"<extra_id_{i}>" for i in range(extra_ids)]
        _add_specials(backend, names, flags)
        self.eos_token = eos_token
        self.eos_id = backend.token_to_id(eos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=["$A", eos_token], special_tokens=[(eos_token, self.eos_id)]
        )
        super().__init__(backend, max_length, pad_token)

    @classmethod
    def from_file(cls, path: str, *, extra_ids: int = 100, **kwargs) -> T5Tokenizer:
        """From a sentencepiece model (spiece.model); sentinels go after its pieces, reversed."""
        pieces, types, unk_id, charsmap = _read_spm(path)
        present = {p for p, _ in pieces}
        sentinels = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
        vocab = pieces + [(s, 0.0) for s in sentinels if s not in present]
        special = [
            AddedToken(p, normalized=False, special=t == _SPM_CONTROL)
            for (p, _), t in zip(pieces, types)
            if t in (_SPM_CONTROL, _SPM_USER_DEFINED)
        ]
        return cls(
            vocab, unk_id=unk_id, charsmap=charsmap, extra_ids=extra_ids, special=special, **kwargs
        )

    @classmethod
    def from_json(cls, path: str, **kwargs) -> T5Tokenizer:
        """From a `tokenizers` tokenizer.json holding a Unigram model (vocab as is)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model") or {}
        if model.get("type") != "Unigram":
            raise ValueError(f"{path}: expected a Unigram model, found {model.get('type')!r}")
        charsmap = None
        stack = [data.get("normalizer")]
        while stack:
            norm = stack.pop()
            if isinstance(norm, dict):
                if norm.get("type") == "Precompiled" and norm.get("precompiled_charsmap"):
                    charsmap = base64.b64decode(norm["precompiled_charsmap"])
                stack.extend(norm.get("normalizers") or [])
        special = [_added_token(t) for t in data.get("added_tokens") or []]
        return cls(
            [tuple(v) for v in model["vocab"]],
            unk_id=model.get("unk_id", 2),
            charsmap=charsmap,
            special=special,
            **kwargs,
        )

    @classmethod
    def from_folder(cls, folder: str, **kwargs) -> T5Tokenizer:
        """From a tokenizer folder (FLUX `tokenizer_2/`, umT5): spiece.model, else tokenizer.json.

        `extra_ids` and the special token names come from tokenizer_config.json /
        special_tokens_map.json when present; keyword arguments override them.
        """
        folder = str(folder)
        settings, flags = _read_config(folder)
        for key in ("eos_token", "pad_token", "unk_token", "extra_ids"):
            if key in settings:
                kwargs.setdefault(key, settings[key])
        kwargs.setdefault("added_tokens", flags)
        model = _require(folder, "spiece.model")
        json_path = _require(folder, "tokenizer.json")
        if model:
            return cls.from_file(model[0], **kwargs)
        if json_path:
            return cls.from_json(json_path[0], **kwargs)
        raise FileNotFoundError(
            f"no T5 tokenizer in {folder}: looked for spiece.model or tokenizer.json"
        )
