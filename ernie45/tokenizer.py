"""ERNIE 4.5 tokenizer: encode/decode, chat template, streaming detokenization.

Matches ``transformers.AutoTokenizer`` on the same files; which files are read, and how, is
:mod:`ernie45.tokenizer_files`. Added tokens are matched whole in text, leftmost-longest, before
the model sees the rest.

Decoding is the Llama decoder chain: ``▁`` -> space, byte fallback, fuse, optional left strip. A run of
byte-fallback tokens decodes as one UTF-8 string, or, if invalid, as one U+FFFD per byte (the
``tokenizers`` rule), so :class:`IncrementalDetokenizer` holds a byte run back until a non-byte token
closes it: a later byte could still invalidate the whole run. That is what makes the streamed deltas
always add up to :meth:`Tokenizer.decode`, which is the same streamer run to the end.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from .tokenizer_files import (SPECIAL_TOKEN_KEYS, AddedToken, collect_added_tokens, open_backend, read_json,
                              token_content, token_tables)

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


class Tokenizer:
    """An ERNIE 4.5 tokenizer; build it with :meth:`from_dir`."""

    def __init__(self, backend, added: list[AddedToken], config: dict[str, Any], chat_template: str):
        self._backend, self.chat_template, self._compiled = backend, chat_template, (None, None)
        self._added = {t.content: t for t in added}
        self._special = {k: token_content(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None}
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.special_ids = frozenset(t.id for t in added if t.special)
        self._strip_left = backend.strip_left
        self._texts, self._bytes = token_tables(backend.pieces(), added, backend.byte_fallback)
        longest_first = sorted(self._added, key=len, reverse=True)  # leftmost-longest via re alternation
        self._added_re = re.compile("|".join(map(re.escape, longest_first))) if added else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a checkpoint directory's tokenizer (``tokenizer.model``, else ``tokenizer.json``)."""
        path = Path(path)
        config = read_json(path / "tokenizer_config.json")
        legacy = "added_tokens_decoder" not in config  # then (only) transformers reads the two older files
        if legacy:
            config.update(read_json(path / "special_tokens_map.json"))
        backend = open_backend(path)
        if config.get("add_prefix_space") and not backend.matches_added:
            raise ValueError(f"{path / 'tokenizer_config.json'} sets add_prefix_space=true, which ERNIE 4.5 never "
                             "does; set it to false, or use the tokenizer.json that this setting came with")
        added = collect_added_tokens(path, config, backend, read_json(path / "added_tokens.json") if legacy else {})
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

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw byte of a byte-fallback token (``<0xHH>``) as ``bytes``; None for any other id."""
        byte = self._bytes.get(token_id)
        return None if byte is None else bytes([byte])

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


# ----- chat rendering --------------------------------------------------------------------------
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
