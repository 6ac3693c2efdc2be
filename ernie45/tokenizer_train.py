"""Train a SentencePiece tokenizer in ERNIE 4.5's layout and write the Hugging Face tokenizer files.

For the project's own default model: the result loads with :meth:`ernie45.tokenizer.Tokenizer.from_dir`
and with ``transformers.AutoTokenizer.from_pretrained`` (``LlamaTokenizer``), and both agree.

Choices, following the released ERNIE 4.5 tokenizer (spec §7): SentencePiece BPE, Llama-style; byte
fallback, digits split one per token, no normalisation, no dummy prefix, runs of spaces kept (and
learnable as whitespace-only pieces). Ids: ``<unk>`` 0 (also padding), ``<s>`` 1 (BOS), ``</s>`` 2 (EOS),
then ``<|begin_of_sentence|>`` / ``<|end_of_sentence|>`` (chat start / end of an assistant turn) and the
``<mask:N>`` markers ERNIE names (``<mask:1>`` mask, ``<mask:4..7>`` system/header start and end), then
the 256 byte pieces, then learned merges. Every special token is a SentencePiece control piece, so the
model never produces one from plain text; in text they are matched as added tokens instead. Training
text is cut into lines, as ERNIE's own vocabulary was: it has no newline piece and ``\\n`` is the byte
token ``<0x0A>``.

The released vocabulary differs in order (digits at 3..12, bytes from 13, the chat tokens near the end
of the 100,295 base pieces); ids of a trained tokenizer are therefore not interchangeable with it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Iterator

from ernie45.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "cls_token": "<|begin_of_sentence|>",
    "sep_token": "<|end_of_sentence|>",
    "mask_token": "<mask:1>",
}
EXTRA_SPECIAL_TOKENS = ["<mask:4>", "<mask:5>", "<mask:6>", "<mask:7>"]  # sys start/end, header start/end
CONTROL_TOKENS = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>", *EXTRA_SPECIAL_TOKENS]
MODEL_MAX_LENGTH = 131072


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *,
                        chat_template: str = DEFAULT_CHAT_TEMPLATE, character_coverage: float = 0.9995,
                        max_lines: int = 10_000_000, num_threads: int = 2) -> Tokenizer:
    """Train on ``texts`` and write tokenizer.model, tokenizer_config.json, special_tokens_map.json.

    ``vocab_size`` counts everything (3 meta + 7 special + 256 byte pieces + merges) and is the final
    ``len(tokenizer)``. ``max_lines`` caps the lines SentencePiece samples (it holds them in memory).
    Returns the written tokenizer, loaded back with :meth:`Tokenizer.from_dir`.
    """
    import sentencepiece

    minimum = 3 + len(CONTROL_TOKENS) + 256 + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges: the special and byte pieces "
                         f"alone take {minimum - 1}")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_by_whitespace=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=CONTROL_TOKENS,
            character_coverage=character_coverage, input_sentence_size=max_lines, shuffle_input_sentence=True,
            max_sentence_length=1 << 16, num_threads=num_threads, minloglevel=2)
    except RuntimeError as err:
        raise ValueError(f"SentencePiece training failed: {str(err).rstrip('.')}. A vocab_size larger than the "
                         "text supports fails like this; pass more text or a smaller vocab_size") from err
    return write_tokenizer_files(model.getvalue(), out_dir, chat_template=chat_template)


def write_tokenizer_files(model_proto: bytes, out_dir: str | Path, *,
                          chat_template: str = DEFAULT_CHAT_TEMPLATE) -> Tokenizer:
    """Write a SentencePiece model in ERNIE's layout as the Hugging Face tokenizer files."""
    import sentencepiece

    ids = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *CONTROL_TOKENS])}
    sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    wrong = {token: sp.piece_to_id(token) for token, i in ids.items() if sp.piece_to_id(token) != i}
    if wrong:
        raise ValueError(f"the SentencePiece model does not have ERNIE's special-token ids: {wrong}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model_proto)
    added = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for token, i in ids.items()}
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        **SPECIAL_TOKENS,
        "additional_special_tokens": EXTRA_SPECIAL_TOKENS,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {**SPECIAL_TOKENS, "additional_special_tokens": EXTRA_SPECIAL_TOKENS})
    return Tokenizer.from_dir(out)


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
