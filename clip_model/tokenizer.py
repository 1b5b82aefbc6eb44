"""CLIP's byte-level BPE tokenizer: OpenAI's algorithm, with fast batched encoding and a trainer.

Encoding is exactly OpenAI's ``simple_tokenizer`` (ftfy + HTML unescaping, whitespace collapse,
lowercasing, CLIP's pre-tokenisation regex, byte-to-unicode mapping, ``</w>`` end-of-word marker).
``clip_model/_bpe_reference.py`` is a plain transcription of that code; tests check id equality.

Why this one is fast (same ids, see ``benchmarks/bench_tokenizer.py``):
- captions that ftfy/HTML unescaping provably leave alone (or only unescape / uncurl quotes) skip ftfy's full
  pipeline (``clip_model.ftfy_shortcuts``, verified against ftfy at import, with a fallback);
- no pre-tokeniser match contains a space, so a text's ids are the ids of its space-delimited chunks:
  a batch is joined into one string and split on spaces, and each chunk's packed int32 ids are cached, so a
  batch's ids are one ``bytes.join`` (no Python int per id) and rows are padded with vectorised numpy;
- a batch's new chunks (each distinct one once) are pre-tokenised by one regex call per kind of text (an
  equivalent, faster stdlib pattern for ASCII; none for a chunk of ASCII letters, the commonest, which is one
  word); words share the chunks' cache, and the batch's new words are BPE-encoded by ONE call of HF
  ``tokenizers``' Rust BPE (OpenAI's merge order), the only per-word cost left that is not a dict lookup.
"""

from __future__ import annotations

import codecs
import gzip
import operator
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from itertools import compress, count, repeat

import numpy as np
import regex
import torch

from clip_model.ftfy_shortcuts import clean_text, fast_clean, has_entity, skips_ftfy  # noqa: F401 (re-exported)

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
EOW = "</w>"
# OpenAI uses lines 1 .. 49152-256-2 of bpe_simple_vocab_16e6.txt.gz (after the header line).
OPENAI_NUM_MERGES = 49152 - 256 - 2
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The same matches on lowercased printable ASCII (all the pattern ever sees: text is lowercased first), where
# \p{L} is [a-z] and \p{N} is [0-9]. The alternatives are reordered, commonest first: a match's first character
# picks its alternative (a letter, a digit, or else "'" or "<" before the catch-all), so the order cannot
# change a match; no case folding either (~30% faster than the pattern as written).
_ASCII_PATTERN = re.compile(
    r"""[a-z]+|[0-9]|'(?:s|t|re|ve|m|ll|d)|<\|(?:startoftext|endoftext)\|>|[^\sa-z0-9]+""", re.ASCII
)
_SEP = "\x00"  # separates texts in a batch; texts whose cleaned form holds it take the per-text path
_SEP_ID = -1
_ID = np.dtype(np.int32)  # cached ids are packed int32 bytes
_NO_MERGES_HELP = (
    "Tokenizer needs a merges file: pass merges_path= the OpenAI file bpe_simple_vocab_16e6.txt.gz "
    "(from the openai/CLIP repository; this package does not bundle or download it) or a file "
    "written by Tokenizer.train(texts, vocab_size, out_path)."
)


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from bytes to printable unicode characters (no whitespace/controls)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read an OpenAI-layout merges file (.txt or .txt.gz): a header line, then one 'a b' merge per line.

    OpenAI's file holds more merges than CLIP uses, so at most 48,894 are taken unless the header
    declares ``num_merges=N`` (files written by ``Tokenizer.train``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"merges file not found: {path!r}. {_NO_MERGES_HELP}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read merges file {path!r} as UTF-8 text ({e})") from e
    header = re.search(r"num_merges=(\d+)", lines[0])
    limit = int(header.group(1)) if header else OPENAI_NUM_MERGES
    merges = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected a merge 'a b', got {line[:80]!r}")
        merges.append((parts[0], parts[1]))
        if len(merges) == limit:
            break
    if header and len(merges) < limit:
        raise ValueError(f"{path}: header declares {limit} merges but the file has {len(merges)}")
    return merges


def write_merges(merges: Sequence[tuple[str, str]], path: str | os.PathLike) -> None:
    """Write merges in OpenAI's layout; gzip when the name ends in .gz.

    No trailing newline, so OpenAI's own loader (which slices lines 1..48,894) reads exactly these
    merges when there are at most that many.
    """
    path = os.fspath(path)
    text = "\n".join([f"#version: 0.2 num_merges={len(merges)}"] + [f"{a} {b}" for a, b in merges])
    data = text.encode("utf-8")
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".tmp") as f:
        f.write(data)
    os.replace(f.name, path)


class _Cache(dict):
    """key -> packed int32 ids; cleared (back to ``fixed``) past max_size."""

    def __init__(self, fixed: dict[str, bytes], max_size: int):
        super().__init__(fixed)
        self._fixed = fixed
        self._max_size = max_size

    def add(self, items: dict[str, bytes]) -> None:
        if len(self) + len(items) > self._max_size:
            self.clear()
            self.update(self._fixed)
        self.update(items)

    def lookup(self, keys: list[str], learn: Callable[[set[str]], dict[str, bytes]]) -> list[bytes]:
        """The packed ids of each key; the keys not cached are computed by one call of ``learn`` (on the set
        of them, so each once) and cached. No Python work per known key: a lookup pass and a scan for misses,
        in C."""
        found = list(map(self.get, keys))
        if None in found:
            misses = list(compress(count(), map(operator.is_, found, repeat(None))))
            missed = list(map(keys.__getitem__, misses))
            learnt = learn(set(missed))
            self.add(learnt)  # (may reset the cache: the ids already found stay right)
            for i, ids in zip(misses, map(learnt.__getitem__, missed)):  # (only the misses: few, once warm)
                found[i] = ids
        return found


def _split_packed(keys: list[str], ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> dict[str, bytes]:
    """key -> its packed ids ``ids[start:end]`` (slices of one bytes object: no Python int per id)."""
    packed = ids.tobytes()
    starts, ends = (starts * _ID.itemsize).tolist(), (ends * _ID.itemsize).tolist()
    return dict(zip(keys, map(packed.__getitem__, map(slice, starts, ends))))


class Tokenizer:
    """CLIP BPE tokenizer. ``tok(texts)`` -> LongTensor [n, context_length]: sot, ids, eot, zero padding."""

    def __init__(
        self,
        merges_path: str | os.PathLike | None = None,
        context_length: int = 77,
        truncate: bool = True,
        cache_size: int = 1_000_000,
    ):
        if merges_path is None:
            raise ValueError(_NO_MERGES_HELP)
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.merges_path = os.fspath(merges_path)
        self.context_length = context_length
        self.truncate = truncate
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        merges = read_merges(merges_path)
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + EOW for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        # Built exactly like OpenAI's: if two merges give the same string, the later id wins.
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.decoder = dict(enumerate(vocab))
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.sot_token = self.encoder[SOT]
        self.eot_token = self.encoder[EOT]
        self._pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        # Space-delimited chunk or pre-tokenised word -> packed ids, in one cache: a word is also the chunk of
        # just that word (the pre-tokeniser matches a word alone as one word), with the same ids, so a new
        # chunk that is a known word is no miss, and a new one-word chunk is stored once. Literal special
        # tokens are never split; the separator (NUL, never inside a chunk of the batch path) gets _SEP_ID.
        fixed = {"": b"", _SEP: _pack(_SEP_ID), SOT: _pack(self.sot_token), EOT: _pack(self.eot_token)}
        self._ids = _Cache(fixed, cache_size)
        hf = _hf_bpe(self.encoder, merges)
        self._hf_encode = getattr(
            hf, "encode_batch_fast", hf.encode_batch
        )  # _fast: no offsets (tokenizers>=0.21)
        # Byte -> its BPE symbol (a codecs charmap), but the spaces that separate words stay spaces.
        self._byte_table = "".join(" " if b == ord(" ") else self.byte_encoder[b] for b in range(256))
        self._ends_word = np.array([self.decoder[i].endswith(EOW) for i in range(len(vocab))])
        # The id NUL really has (a text holding NUL is encoded apart from its batch, see _flat_ids).
        self._nul_token = self.encoder[self.byte_encoder[ord(_SEP)] + EOW]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(merges_path={self.merges_path!r}, vocab_size={self.vocab_size}, "
            f"context_length={self.context_length}, truncate={self.truncate})"
        )

    # --- cache misses: one pre-tokeniser call per kind of text, one Rust BPE call for all new words ---
    def _bpe(self, words: set[str]) -> dict[str, bytes]:
        """word -> packed ids for new words: one call of the Rust BPE (OpenAI's merge order) on the words
        byte-encoded and joined by spaces (no byte encodes to whitespace)."""
        words = list(words)
        text = " ".join(words)
        if not (text.isascii() and text.isprintable()):  # printable ASCII encodes to itself
            text = codecs.charmap_decode(text.encode(), "strict", self._byte_table)[0]  # one C call
        ids = np.array(self._hf_encode([text])[0].ids, dtype=_ID)
        ends = np.flatnonzero(self._ends_word[ids]) + 1  # a word's last token, and only it, ends with "</w>"
        if len(ends) != len(words):  # (cannot happen with a BPE over these words; never guess ids)
            raise RuntimeError(f"Rust BPE gave {len(ends)} word ends for {len(words)} words")
        return _split_packed(words, ids, np.concatenate([[0], ends[:-1]]), ends)

    def _word_ids(self, words: list[str]) -> np.ndarray:
        """Ids of a sequence of pre-tokenised words; words not seen before are BPE-encoded in one call."""
        return np.frombuffer(b"".join(self._ids.lookup(words, self._bpe)), dtype=_ID)

    def _learn(self, missing: set[str]) -> dict[str, bytes]:
        """chunk (and word) -> packed ids for new chunks: their words found by one pre-tokeniser call per kind
        of text, and the words not known yet BPE-encoded by one call."""
        # A chunk of (lowercase) ASCII letters is one word, and the commonest new chunk: no pre-tokeniser, and
        # no lookup either (chunks and words share the cache: a new such chunk is a new word).
        single, groups = [], ([], [])  # (ASCII chunks, others)
        for chunk in missing:  # (one plain loop beats several C-level passes over these few thousand)
            if not chunk.isascii():
                groups[1].append(chunk)
            elif chunk.isalpha():
                single.append(chunk)
            else:
                groups[0].append(chunk)
        # Other chunks are joined with the separator word, the spaces around it keeping it one pre-tokeniser
        # match; one more ends the last chunk. ASCII text has a faster pattern (same words).
        words = []
        for chunks, pattern in zip(groups, (_ASCII_PATTERN, self._pattern)):
            if chunks:
                words += pattern.findall(f" {_SEP} ".join(chunks))
                words.append(_SEP)
        found = list(map(self._ids.get, words))
        new = set(compress(words, map(operator.is_, found, repeat(None))))
        new.update(single)
        learnt = self._bpe(new) if new else {}
        ids = np.frombuffer(b"".join(map(learnt.get, words, found)), dtype=_ID)
        seps = np.flatnonzero(ids == _SEP_ID)
        learnt.update(_split_packed(groups[0] + groups[1], ids, np.concatenate([[0], seps[:-1] + 1]), seps))
        return learnt

    # --- encoding ---
    def encode(self, text: str) -> list[int]:
        """Ids of one text, without start/end tokens."""
        ids = self._word_ids(self._pattern.findall(fast_clean(text)))
        return np.where(ids == _SEP_ID, self._nul_token, ids).tolist()

    def _flat_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(ids of all texts concatenated, row index of each id, rows that need the per-text path)."""
        # The common case inlined (ftfy_shortcuts.plain_ascii: only lowercasing matters).
        pieces = [
            t.lower()
            if t.isascii() and ("&" not in t or not has_entity(t)) and t.isprintable()
            else fast_clean(t)
            for t in texts
        ]
        # No pre-tokeniser match contains whitespace, so the tokens of a text are the tokens of its
        # space-delimited chunks, and texts are told apart by a separator chunk.
        joined, odd = f" {_SEP} ".join(pieces), []
        if joined.count(_SEP) >= len(pieces):  # a NUL survived cleaning: those texts take the per-text path
            odd = [i for i, p in enumerate(pieces) if _SEP in p]
            joined = f" {_SEP} ".join("" if _SEP in p else p for p in pieces)
        chunks = joined.split(" ")
        flat = np.frombuffer(b"".join(self._ids.lookup(chunks, self._learn)), dtype=_ID).astype(np.int64)
        is_sep = flat == _SEP_ID
        rows = np.cumsum(is_sep)
        keep = ~is_sep
        return flat[keep], rows[keep], odd

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, without start/end tokens (same as ``[encode(t) for t in texts]``)."""
        texts = _check_texts(texts)
        ids, rows, odd = self._flat_ids(texts)
        counts = np.bincount(rows, minlength=len(texts))
        out = [part.tolist() for part in np.split(ids, np.cumsum(counts)[:-1])] if texts else []
        for i in odd:
            out[i] = self.encode(texts[i])
        return out

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool | None = None
    ) -> torch.Tensor:
        """Tokenize to a LongTensor [n, context_length] like ``clip.tokenize``.

        Too-long texts are cut to ``context_length`` with the end token kept last; with ``truncate=False``
        they raise a ValueError naming the text and its length.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = _check_texts(texts)
        context_length = self.context_length if context_length is None else context_length
        truncate = self.truncate if truncate is None else truncate
        n, room = len(texts), context_length - 2
        ids, rows, odd = self._flat_ids(texts)
        counts = np.bincount(rows, minlength=n)
        starts = np.cumsum(counts) - counts
        pos = np.arange(len(ids)) - starts[rows]
        if not truncate:
            for i in odd:
                counts[i] = len(self.encode(texts[i]))
            too_long = np.flatnonzero(counts > room)
            if len(too_long):
                i = int(too_long[0])
                preview = texts[i] if len(texts[i]) <= 100 else texts[i][:100] + "..."
                raise ValueError(
                    f"text {i} is {counts[i] + 2} tokens long (with start/end), more than context_length "
                    f"{context_length} and truncate=False: {preview!r}"
                )
        out = np.zeros((n, context_length), dtype=np.int64)
        out[:, 0] = self.sot_token
        fits = pos < room
        out[rows[fits], pos[fits] + 1] = ids[fits]
        out[np.arange(n), np.minimum(counts, room) + 1] = self.eot_token
        for i in odd:
            row = self.encode(texts[i])[:room]
            out[i] = 0
            out[i, : len(row) + 2] = [self.sot_token, *row, self.eot_token]
        return torch.from_numpy(out)

    # --- decoding ---
    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ids; a leading start token is dropped and decoding stops at the first end token."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor | np.ndarray) else list(ids)
        if ids and ids[0] == self.sot_token:
            ids = ids[1:]
        if self.eot_token in ids:
            ids = ids[: ids.index(self.eot_token)]
        bad = [i for i in ids if i not in self.decoder]
        if bad:
            raise ValueError(f"ids outside the vocabulary (size {self.vocab_size}): {bad[:10]}")
        text = "".join(self.decoder[i] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace(EOW, " ").rstrip(" ")

    # --- training ---
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        out_path: str | os.PathLike,
        min_frequency: int = 2,
        context_length: int = 77,
    ) -> Tokenizer:
        """Learn ``vocab_size - 514`` merges from captions and write them in OpenAI's layout.

        ``vocab_size`` counts the 512 byte symbols, the merges and the two special tokens. Text is
        normalised and pre-tokenised exactly as at encoding time; HF ``tokenizers`` does the counting
        and merging. If the corpus runs out of pairs seen ``min_frequency`` times, fewer merges are
        written (with a warning) and the returned tokenizer's ``vocab_size`` says how many ids it has.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers

        n_merges = vocab_size - 512 - 2
        if n_merges < 0:
            raise ValueError(
                f"vocab_size must be >= 514 (512 byte symbols + 2 special tokens), got {vocab_size}"
            )
        byte_encoder = bytes_to_unicode()
        pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        encoded: dict[str, str] = {SOT: "", EOT: ""}  # special tokens are never split, so never trained on

        def byte_words(word: str) -> str:
            if word not in encoded:
                encoded[word] = "".join(byte_encoder[b] for b in word.encode("utf-8", errors="surrogatepass"))
            return encoded[word]

        def corpus() -> Iterable[str]:
            # Byte-encoded words contain no whitespace, so a whitespace split recovers them in Rust.
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(
                        f"Tokenizer.train expects str texts, got {type(text).__name__}: {text!r:.80}"
                    )
                yield " ".join(map(byte_words, pattern.findall(fast_clean(text))))

        hf = HFTokenizer(models.BPE(end_of_word_suffix=EOW))
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.BpeTrainer(
            vocab_size=n_merges + 512,  # HF counts the symbols it saw (<= 512) plus new tokens
            min_frequency=min_frequency,
            special_tokens=[],
            end_of_word_suffix=EOW,
            show_progress=False,
        )
        if n_merges:
            hf.train_from_iterator(corpus(), trainer=trainer)
            merges = _hf_merges(hf)[:n_merges]
        else:
            merges = []
        if len(merges) < n_merges:
            warnings.warn(
                f"corpus only supports {len(merges)} merges (min_frequency={min_frequency}); "
                f"vocab_size is {len(merges) + 514} instead of {vocab_size}",
                stacklevel=2,
            )
        write_merges(merges, out_path)
        return cls(out_path, context_length=context_length)


def _pack(token_id: int) -> bytes:
    return np.array([token_id], dtype=_ID).tobytes()


def _hf_bpe(encoder: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    # No Rust-side cache: only words never seen before get here (the Tokenizer keeps every word's ids).
    hf = HFTokenizer(models.BPE(vocab=encoder, merges=merges, end_of_word_suffix=EOW, cache_capacity=0))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # words are byte-encoded and space-joined
    return hf


def _hf_merges(hf) -> list[tuple[str, str]]:
    import json

    merges = json.loads(hf.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    if set(map(type, texts)) <= {str}:  # the common case, checked without a Python-level loop
        return texts
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str: {t!r:.80}")
    return texts  # str subclasses
