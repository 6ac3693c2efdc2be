"""Token streams and fixed-length training windows, addressed by a single integer position.

Tokenization happens in exactly one place, :func:`tokenize_pieces`, which takes the encoder as a plain
function (``str -> list[int]``): the project's SentencePiece tokenizer in ``ernie45 data``, a byte-level
stand-in in tests. Each corpus piece becomes ``[BOS] + encode(piece) + [EOS]``; the pieces are
concatenated into one int32 stream, stored as ``<split>.tokens.npy`` (plain .npy, never pickled).

Windows: the stream is cut at multiples of ``seq_len`` into windows of ``seq_len + 1 + extra`` tokens
(``extra`` = number of MTP depths), so every window holds its inputs ``x[:T]``, the next-token labels
``x[1:T+1]`` and, for MTP, the labels two ahead ``x[2:T+2]`` (spec §5: the last position uses the extra
token). Training order is a fresh permutation of the windows per epoch, drawn from
``numpy.random.default_rng([seed, epoch])``; position ``p`` is window ``perm_{p // n}[p % n]``. A batch
is positions ``p .. p+B-1``, so the whole data state of a run is one integer: resuming at position
``p`` replays exactly the batches a straight run would have seen, with nothing else to save.

Shape legend: B batch, T seq_len, X = T + 1 + extra window length, N stream tokens.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .corpus import CorpusError, SPLITS, read_manifest, read_pieces, write_manifest

Encode = Callable[[str], list[int]]
TOKENIZER_SUBDIR = "tokenizer"


def tokenize_pieces(pieces: Iterable[str], encode: Encode, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """The one tokenization call: pieces -> [BOS] + ids + [EOS] each, concatenated.  # [N] int32"""
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    parts = [np.asarray(head + encode(p) + tail, dtype=np.int64) for p in pieces]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if stream.size and (stream.min() < 0 or stream.max() >= 2**31):
        raise ValueError("token ids must be in [0, 2^31); the encoder returned ids outside that range")
    return stream.astype(np.int32)


def tokens_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.tokens.npy"


def save_tokens(path: Path, tokens: np.ndarray) -> str:
    """Write a .npy (allow_pickle off) and return its sha256."""
    np.save(path, np.ascontiguousarray(tokens, dtype=np.int32), allow_pickle=False)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    path = tokens_path(data_dir, split)
    if not path.is_file():
        raise CorpusError(f"no {path.name} in {data_dir}; tokenize the corpus first: "
                          f"ernie45 data tokenize --data {data_dir} --vocab-size 8192")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def tokenize_corpus(data_dir: str | Path, encode: Encode, bos_id: int | None, eos_id: int | None,
                    tokenizer_info: dict | None = None) -> dict:
    """Tokenize every split of a built corpus into ``<split>.tokens.npy``; record it in corpus.json."""
    manifest = read_manifest(data_dir)
    info = {"tokenizer": tokenizer_info or {}, "bos_id": bos_id, "eos_id": eos_id}
    for split in SPLITS:
        tokens = tokenize_pieces(read_pieces(data_dir, split), encode, bos_id, eos_id)
        digest = save_tokens(tokens_path(data_dir, split), tokens)
        info[split] = {"file": tokens_path(data_dir, split).name, "tokens": int(tokens.size), "sha256": digest,
                       "max_id": int(tokens.max()) if tokens.size else -1}
    manifest["tokens"] = info
    write_manifest(data_dir, manifest)
    return info


def prepare_tokens(data_dir: str | Path, vocab_size: int | None = None, tokenizer_dir: str | Path | None = None,
                   num_threads: int = 2) -> dict:
    """Train a SentencePiece tokenizer on train.txt (or use ``tokenizer_dir``), then tokenize the corpus.

    The tokenizer files are written to ``<data_dir>/tokenizer`` either way, so a trained model can ship
    exactly the tokenizer its data was made with.
    """
    from ernie45.tokenizer import Tokenizer

    out = Path(data_dir) / TOKENIZER_SUBDIR
    if tokenizer_dir is not None:
        if Path(tokenizer_dir).resolve() != out.resolve():
            shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
        tok = Tokenizer.from_dir(out)
    elif vocab_size is not None:
        from ernie45.tokenizer_train import train_sentencepiece

        tok = train_sentencepiece(read_pieces(data_dir, "train"), vocab_size, out, num_threads=num_threads)
    else:
        raise ValueError("give vocab_size (train a tokenizer on train.txt) or tokenizer_dir (use an existing one)")
    model_file = out / "tokenizer.model"
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest() if model_file.is_file() else None
    info = {"dir": TOKENIZER_SUBDIR, "vocab_size": len(tok), "tokenizer_model_sha256": digest}
    return tokenize_corpus(data_dir, tok.encode, tok.bos_token_id, tok.eos_token_id, info)


class WindowSampler:
    """Shuffled fixed-length windows of a token stream; ``batch(position)`` is a pure function."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, extra: int = 0, seed: int = 0):
        self.tokens, self.seq_len, self.batch_size, self.extra, self.seed = tokens, seq_len, batch_size, extra, seed
        self.window = seq_len + 1 + extra
        self.n_windows = max((len(tokens) - 1 - extra) // seq_len, 0)
        if self.n_windows < 1:
            raise CorpusError(f"{len(tokens)} tokens cannot fill one window of {self.window}; use a shorter "
                              "--seq-len or a bigger corpus")
        self._perm_epoch, self._perm = -1, None

    def window_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def batch(self, position: int) -> torch.Tensor:
        """Windows at positions ``position .. position+B-1``.  # [B, X] int64"""
        rows = [self.window_at(self.window_index(p)) for p in range(position, position + self.batch_size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def window_at(self, index: int) -> np.ndarray:  # [X]
        start = index * self.seq_len
        return np.asarray(self.tokens[start:start + self.window])


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, extra: int = 0,
                 max_batches: int | None = None) -> list[torch.Tensor]:
    """Held-out windows in stream order (no shuffle), batched; the last batch may be smaller.  # [b, X]"""
    sampler = WindowSampler(tokens, seq_len, batch_size, extra)
    n = sampler.n_windows if max_batches is None else min(sampler.n_windows, max_batches * batch_size)
    rows = [sampler.window_at(i) for i in range(n)]
    return [torch.from_numpy(np.stack(rows[i:i + batch_size]).astype(np.int64)) for i in range(0, n, batch_size)]
