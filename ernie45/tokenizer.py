"""ERNIE 4.5 tokenizer: checkpoint files, encode/decode, chat template, streaming detokenization.

Matches ``transformers.AutoTokenizer`` on the same files. transformers 5.x loads an ERNIE checkpoint as
``LlamaTokenizer`` or (``config.json`` of type ``ernie4_5*``) as ``TokenizersBackend``; on ERNIE-style
files both reduce to plain SentencePiece, and so do we:

- ``tokenizer.model`` (SentencePiece BPE) comes first: the text between added tokens is encoded by
  SentencePiece itself. We require ERNIE's normaliser (identity, no dummy prefix, no space folding);
  on other settings the two transformers loaders disagree, so such a model is refused (or passed over
  for ``tokenizer.json`` when present).
- ``tokenizer.json`` (``tokenizers`` library, optional) is used when it is the only tokenizer file.
- Added tokens (``tokenizer_config.json``'s ``added_tokens_decoder`` and special-token names; without
  ``added_tokens_decoder``, as transformers, also ``special_tokens_map.json`` and ``added_tokens.json``)
  are matched whole in text, leftmost-longest, before the model sees the rest.

Decoding is the Llama decoder chain: ``▁`` -> space, byte fallback, fuse, optional left strip. A run of
byte-fallback tokens decodes as one UTF-8 string, or, if invalid, as one U+FFFD per byte (the
``tokenizers`` rule), so :class:`IncrementalDetokenizer` holds a byte run back until a non-byte token
closes it: a later byte could still invalidate the whole run. That is what makes the streamed deltas
always add up to :meth:`Tokenizer.decode`, which is the same streamer run to the end.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

# ERNIE 4.5 chat format (spec §7): <|begin_of_sentence|>, then system "text\n", user "User: text\n",
# assistant "Assistant: text<|end_of_sentence|>"; the generation prompt is "Assistant: ".
DEFAULT_CHAT_TEMPLATE = (
    "{%- set bos = cls_token if cls_token is defined else '<|begin_of_sentence|>' -%}\n"
    "{%- set eot = sep_token if sep_token is defined else '<|end_of_sentence|>' -%}\n"
    "{{- bos -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message.content is not string -%}\n"
    "        {{- raise_exception('ERNIE 4.5 chat messages need string content') -}}\n"
    "    {%- elif message.role == 'system' -%}{{- message.content ~ '\\n' -}}\n"
    "    {%- elif message.role == 'user' -%}{{- 'User: ' ~ message.content ~ '\\n' -}}\n"
    "    {%- elif message.role == 'assistant' -%}{{- 'Assistant: ' ~ message.content ~ eot -}}\n"
    "    {%- else -%}{{- raise_exception('ERNIE 4.5 chat has no role ' ~ message.role) -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}\n"
)
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


class Tokenizer:
    """An ERNIE 4.5 tokenizer; build it with :meth:`from_dir`."""

    def __init__(self, backend, added: list[AddedToken], config: dict[str, Any], chat_template: str):
        self._backend, self.chat_template, self._compiled = backend, chat_template, (None, None)
        self._added = {t.content: t for t in added}
        self._special = {k: _content(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None}
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.special_ids = frozenset(t.id for t in added if t.special)
        self._strip_left = backend.strip_left
        self._texts, self._bytes = _token_tables(backend.pieces(), added, backend.byte_fallback)
        longest_first = sorted(self._added, key=len, reverse=True)  # leftmost-longest via re alternation
        self._added_re = re.compile("|".join(map(re.escape, longest_first))) if added else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a checkpoint directory's tokenizer (``tokenizer.model``, else ``tokenizer.json``)."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        legacy = "added_tokens_decoder" not in config  # then (only) transformers reads the two older files
        if legacy:
            config.update(_read_json(path / "special_tokens_map.json"))
        backend = _open_backend(path)
        if config.get("add_prefix_space") and not backend.matches_added:
            raise ValueError(f"{path / 'tokenizer_config.json'} sets add_prefix_space=true, which ERNIE 4.5 never "
                             "does; set it to false, or use the tokenizer.json that this setting came with")
        added = _collect_added_tokens(path, config, backend, _read_json(path / "added_tokens.json") if legacy else {})
        if backend.matches_added:
            backend.register(added)
        template_file = path / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        return cls(backend, added, config, template or DEFAULT_CHAT_TEMPLATE)

    # ----- vocabulary and special tokens ------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: ``len(hf_tokenizer)``, not its ``vocab_size``."""
        return len(self._texts)

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens this checkpoint sets (``bos_token`` ... ``mask_token``)."""
        return dict(self._special)

    @property
    def added_tokens(self) -> list[AddedToken]:
        return sorted(self._added.values(), key=lambda t: t.id)

    def token_to_id(self, token: str) -> int | None:
        """Id of an added token or of one vocabulary piece (a space may stand for ``▁``)."""
        added = self._added.get(token)
        return added.id if added else self._backend.piece_to_id(token.replace(" ", "▁"))

    def _special_id(self, key: str) -> int | None:
        return self._added[self._special[key]].id if key in self._special else None

    bos_token, eos_token, unk_token, pad_token, cls_token, sep_token, mask_token = (
        property(lambda self, k=k: self._special.get(k)) for k in SPECIAL_TOKEN_KEYS)
    bos_token_id, eos_token_id, unk_token_id, pad_token_id, cls_token_id, sep_token_id, mask_token_id = (
        property(lambda self, k=k: self._special_id(k)) for k in SPECIAL_TOKEN_KEYS)

    # ----- encode / decode --------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``; added and special tokens written in it become their own ids.

        ``add_special_tokens`` adds BOS/EOS only where tokenizer_config.json asks (``add_bos_token``,
        ``add_eos_token``); both are false for ERNIE 4.5, which never adds them.
        """
        ids = self._backend.encode(text) if self._backend.matches_added else self._encode_split(text)
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token
        return ids

    def _encode_split(self, text: str) -> list[int]:
        ids, start = [], 0
        for token, begin, end in self._find_added(text):
            ids += self._backend.encode(text[start:begin]) if begin > start else []
            ids.append(token.id)
            start = end
        return ids + (self._backend.encode(text[start:]) if start < len(text) else [])

    def _find_added(self, text: str) -> Iterable[tuple[AddedToken, int, int]]:
        """(token, start, end) of each added token; lstrip/rstrip swallow neighbouring whitespace."""
        previous_end = 0
        for match in self._added_re.finditer(text) if self._added_re else ():
            token, begin, end = self._added[match.group()], match.start(), match.end()
            if begin < previous_end:  # inside whitespace the previous token's rstrip took
                continue
            while token.lstrip and begin > previous_end and text[begin - 1].isspace():
                begin -= 1
            while token.rstrip and end < len(text) and text[end].isspace():
                end += 1
            previous_end = end
            yield token, begin, end

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``, as transformers' ``decode`` (no tokenization-space clean-up)."""
        stream = IncrementalDetokenizer(self, skip_special_tokens)
        return "".join(stream.feed(i) for i in ids) + stream.finish()

    # ----- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the checkpoint's template (ERNIE 4.5's when it has none).

        The template sees what transformers passes it: the named special tokens, ``messages``,
        ``tools``/``documents`` (None), ``add_generation_prompt`` and any ``kwargs``.
        """
        if self._compiled[0] != self.chat_template:
            self._compiled = (self.chat_template, _compile(self.chat_template))
        context = {**self._special, "tools": None, "documents": None, **kwargs}
        return self._compiled[1].render(messages=messages, add_generation_prompt=add_generation_prompt, **context)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Prompt ids: the rendered chat encoded with ``add_special_tokens=False``, as ERNIE expects."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


class IncrementalDetokenizer:
    """Token ids in, one at a time; text deltas out that add up exactly to ``Tokenizer.decode``.

    ``feed`` returns new text (often ""). ``finish`` returns what is still held back: the bytes of an
    open byte-fallback run, which decode as U+FFFD only if the sequence really ends there.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._run = bytearray()
        self._strip_left = tokenizer._strip_left

    def feed(self, token_id: int) -> str:
        tok = self._tok
        if not 0 <= token_id < len(tok._texts) or tok._texts[token_id] is None:
            raise ValueError(f"token id {token_id} is not in this tokenizer's vocabulary (0..{len(tok) - 1})")
        if self._skip and token_id in tok.special_ids:  # removed before decoding, as transformers does
            return ""
        if token_id in tok._bytes:
            self._run.append(tok._bytes[token_id])
            return ""
        return self._emit(self._close_run() + tok._texts[token_id])

    def finish(self) -> str:
        """Flush the held bytes at the end of the sequence."""
        return self._emit(self._close_run())

    def _close_run(self) -> str:
        run, self._run = bytes(self._run), bytearray()
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(run)

    def _emit(self, text: str) -> str:
        while self._strip_left and text:  # Strip(left=n) after Fuse: only the start of the whole text
            if text[0] != " ":
                self._strip_left = 0
                break
            text, self._strip_left = text[1:], self._strip_left - 1
        return text


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


def _open_backend(path: Path):
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
def _collect_added_tokens(path: Path, config: dict[str, Any], backend, legacy: dict[str, int]) -> list[AddedToken]:
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
    names = [_content(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None]
    names += [_content(t) for t in extra]
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


def _token_tables(pieces: list[str | None], added: list[AddedToken], byte_fallback: bool):
    """Per-id text (``▁`` -> space; None where no token) and the byte of each ``<0xHH>`` piece."""
    raw = pieces + [None] * (max([len(pieces)] + [t.id + 1 for t in added]) - len(pieces))
    for t in added:
        raw[t.id] = t.content
    byte_of = {i: int(m.group(1), 16) for i, p in enumerate(raw) if byte_fallback and p and len(p) == 6
               and (m := _BYTE_PIECE.fullmatch(p))}
    return [None if p is None else p.replace("▁", " ") for p in raw], byte_of


# ----- files and chat rendering ----------------------------------------------------------------
def _content(token: str | dict) -> str:
    return token["content"] if isinstance(token, dict) else token


def _read_json(file: Path) -> dict[str, Any]:
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


def _compile(template: str):
    """Compile in a sandbox as transformers does: trim_blocks, lstrip_blocks, its helpers and filters."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)
