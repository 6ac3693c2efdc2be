"""Reading a checkpoint's tokenizer files: the backend model, its decoder, added and special tokens.

transformers 5.x loads an ERNIE checkpoint as ``LlamaTokenizer`` or (``config.json`` of type
``ernie4_5*``) as ``TokenizersBackend``; on ERNIE-style files both reduce to plain SentencePiece,
and so do we:

- ``tokenizer.model`` (SentencePiece BPE) comes first: the text between added tokens is encoded by
  SentencePiece itself. We require ERNIE's normaliser (identity, no dummy prefix, no space folding);
  on other settings the two transformers loaders disagree, so such a model is refused (or passed over
  for ``tokenizer.json`` when present).
- ``tokenizer.json`` (``tokenizers`` library, optional) is used when it is the only tokenizer file;
  its decoder must be the Llama chain, the only one :class:`~ernie45.tokenizer.Tokenizer` decodes.
- Added tokens (``tokenizer_config.json``'s ``added_tokens_decoder`` and special-token names; without
  ``added_tokens_decoder``, as transformers, also ``special_tokens_map.json`` and ``added_tokens.json``)
  are collected here; :class:`~ernie45.tokenizer.Tokenizer` matches them whole in text.

A backend offers ``encode``, ``pieces``, ``piece_to_id``, ``byte_fallback``, ``strip_left`` and
``matches_added`` (whether it splits off added tokens itself; then also ``added`` and ``register``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_PROBE = "  a\tb  ｃﬁ \n"  # shows a dummy prefix, space folding, NFKC or tab mapping if the model has one


@dataclass(frozen=True)
class AddedToken:
    """A token matched whole in text (transformers' ``AddedToken``) and the id it maps to."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


# ----- backends --------------------------------------------------------------------------------
class _SentencePieceBackend:
    matches_added, strip_left = False, 0  # added tokens are split off by Tokenizer; no prefix to strip

    def __init__(self, file: Path):
        import sentencepiece

        _refuse_lfs_pointer(file)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromFile(str(file))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{file} is not a valid SentencePiece model ({err}); copy it again from the "
                             "checkpoint, or remove it to use tokenizer.json") from err
        self.byte_fallback = self.sp.is_byte(self.sp.piece_to_id("<0x00>"))
        self.ernie_style = self.sp.normalize(_PROBE) == _PROBE.replace(" ", "▁")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def pieces(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None


class _TokenizersBackend:
    matches_added = True  # the tokenizers library splits added tokens itself, exactly as transformers

    def __init__(self, file: Path):
        try:
            import tokenizers
        except ImportError as err:
            raise ImportError(f"{file} needs the `tokenizers` package: pip install tokenizers") from err
        _refuse_lfs_pointer(file)
        try:
            self.tok, spec = tokenizers.Tokenizer.from_file(str(file)), json.loads(file.read_text(encoding="utf-8"))
        except Exception as err:
            raise ValueError(f"{file} is not a valid tokenizers file ({err}); copy it again from the "
                             "checkpoint") from err
        self.byte_fallback, self.strip_left = _llama_decoder(spec.get("decoder"), file)
        self._added_type = tokenizers.AddedToken

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def pieces(self) -> list[str | None]:
        return [self.tok.id_to_token(i) for i in range(self.tok.get_vocab_size(with_added_tokens=True))]

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def added(self) -> list[AddedToken]:
        return [AddedToken(t.content, i, t.special, t.lstrip, t.rstrip)
                for i, t in self.tok.get_added_tokens_decoder().items()]

    def register(self, added: list[AddedToken]) -> None:
        """Make tokens named only in tokenizer_config.json whole-matched too (as transformers does)."""
        known = {t.content for t in self.added()}
        for t in added:
            if t.content not in known:
                new = self._added_type(t.content, lstrip=t.lstrip, rstrip=t.rstrip, normalized=False, special=t.special)
                self.tok.add_special_tokens([new]) if t.special else self.tok.add_tokens([new])
            if self.tok.token_to_id(t.content) != t.id:
                raise ValueError(f"{t.content!r} has id {t.id} in tokenizer_config.json but "
                                 f"{self.tok.token_to_id(t.content)} in tokenizer.json; the files disagree")


def open_backend(path: Path):
    """The backend of a checkpoint directory: ``tokenizer.model`` when ERNIE-style, else ``tokenizer.json``."""
    model, fast = path / "tokenizer.model", path / "tokenizer.json"
    if model.is_file():
        backend = _SentencePieceBackend(model)
        if backend.ernie_style:
            return backend
        if not fast.is_file():
            raise ValueError(f"{model} normalises text (dummy prefix, space folding or NFKC), unlike ERNIE 4.5, and "
                             "transformers' loaders disagree on such models; add the checkpoint's tokenizer.json")
    if fast.is_file():
        return _TokenizersBackend(fast)
    raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.model (SentencePiece) or tokenizer.json. Copy "
                            "them from the checkpoint, or make one with ernie45.tokenizer_train.train_sentencepiece")


def _llama_decoder(spec: dict | None, file: Path) -> tuple[bool, int]:
    """(byte_fallback, strip_left) of a Llama-style decoder: Replace(▁, ' '), ByteFallback, Fuse, Strip."""
    steps = spec.get("decoders", []) if spec and spec.get("type") == "Sequence" else [spec]
    kinds = [s and s.get("type") for s in steps]
    strip = steps[-1] if kinds[-1:] == ["Strip"] else None
    ok = (kinds[:1] == ["Replace"] and steps[0].get("pattern") == {"String": "▁"} and steps[0].get("content") == " "
          and kinds[1:len(kinds) - bool(strip)] in (["ByteFallback", "Fuse"], ["Fuse"], ["ByteFallback"], [])
          and (not strip or (kinds[-2] == "Fuse" and strip.get("content") == " " and not strip.get("stop"))))
    if not ok:
        raise ValueError(f"{file} has decoder {kinds}; ERNIE 4.5 tokenizers use the Llama chain "
                         "[Replace(▁, ' '), ByteFallback, Fuse] and nothing else is supported")
    return "ByteFallback" in kinds, strip.get("start", 0) if strip else 0


# ----- added tokens ----------------------------------------------------------------------------
def collect_added_tokens(path: Path, config: dict[str, Any], backend, legacy: dict[str, int]) -> list[AddedToken]:
    """Added tokens of the backend, ``added_tokens_decoder``, legacy ``added_tokens.json`` and special names."""
    tokens = {t.content: t for t in backend.added()} if backend.matches_added else {}  # .model has none
    for i, t in config.get("added_tokens_decoder", {}).items():
        if t.get("single_word"):
            raise ValueError(f"added token {t['content']!r} in {path / 'tokenizer_config.json'} is single_word, "
                             "which ERNIE 4.5 tokenizers never use and ernie45 does not support")
        special = t.get("special", False) or (t["content"] in tokens and tokens[t["content"]].special)
        tokens[t["content"]] = AddedToken(t["content"], int(i), special, t.get("lstrip", False), t.get("rstrip", False))
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else extra
    names = [token_content(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None]
    names += [token_content(t) for t in extra]
    for content, i in legacy.items():
        tokens.setdefault(content, AddedToken(content, int(i), special=content in names))
    for content in names:
        if (t := tokens.get(content)) is not None:
            tokens[content] = AddedToken(content, t.id, True, t.lstrip, t.rstrip)
        elif (i := backend.piece_to_id(content)) is not None:
            tokens[content] = AddedToken(content, i)
        else:
            raise ValueError(f"special token {content!r} of {path / 'tokenizer_config.json'} is neither an added "
                             "token nor in the vocabulary; add it to added_tokens_decoder with its id")
    return sorted(tokens.values(), key=lambda t: t.id)


def token_tables(pieces: list[str | None], added: list[AddedToken], byte_fallback: bool):
    """Per-id text (``▁`` -> space; None where no token) and the byte of each ``<0xHH>`` piece."""
    raw = pieces + [None] * (max([len(pieces)] + [t.id + 1 for t in added]) - len(pieces))
    for t in added:
        raw[t.id] = t.content
    byte_of = {i: int(m.group(1), 16) for i, p in enumerate(raw) if byte_fallback and p and len(p) == 6
               and (m := _BYTE_PIECE.fullmatch(p))}
    return [None if p is None else p.replace("▁", " ") for p in raw], byte_of


# ----- files -----------------------------------------------------------------------------------
def token_content(token: str | dict) -> str:
    """The text of a special-token entry, written as a string or as an AddedToken-style dict."""
    return token["content"] if isinstance(token, dict) else token


def read_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``; {} when the file is absent (every tokenizer side file is optional)."""
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); copy it again from the checkpoint") from err


def _refuse_lfs_pointer(file: Path) -> None:
    with open(file, "rb") as f:
        if f.read(24).startswith(b"version https://git-lfs"):
            raise ValueError(f"{file} is a Git LFS pointer, not the file itself; run `git lfs pull` in the checkpoint")
