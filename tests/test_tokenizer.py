"""Tokenizer tests: our files and our Tokenizer against transformers on the same files.

A small SentencePiece model is trained at test time (text below is written for this file) in ERNIE's
layout with ``train_sentencepiece``; transformers then loads it both ways it loads ERNIE checkpoints:
``LlamaTokenizer`` (tokenizer files alone) and ``TokenizersBackend`` (next to an ``ernie4_5`` config.json).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from ernie45.tokenizer import DEFAULT_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer
from ernie45.tokenizer_train import train_sentencepiece

transformers = pytest.importorskip("transformers")

PARAGRAPHS = [
    "The river ran low that summer, and the mill stood quiet for most of July. Children waded across "
    "where the water had once been too deep to stand, and the old miller counted 1,284 stones in the dry "
    "bed before he gave up counting. In the evenings the town gathered on the bridge to watch the light go "
    "orange over the hills.",
    "A tokenizer turns text into numbers and back again. It must never lose a character: spaces, tabs and "
    "newlines all matter, and so do rare symbols that the vocabulary has never seen. When a character is "
    "missing, byte fallback writes it as raw UTF-8 bytes, one token for each byte.",
    "Recipe for a plain loaf: 500 g of flour, 350 ml of warm water, 10 g of salt and 7 g of yeast. Mix, "
    "rest for 45 minutes, fold twice, shape, and bake at 230 degrees for 35 to 40 minutes. Let it cool "
    "for at least an hour before cutting, or the crumb will be gummy.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, i * 2))\n",
    "今天天气很好，我们去公园散步吧。山上的风很大，水也很冷。",
    "The committee met on 2024-03-15 at 09:30 and agreed, after a long debate, to repaint the station in "
    "green and white. Nobody could remember what colour it had been in 1957, so the vote was 7 to 4.",
    "Weather report: light rain in the morning, clearing by noon; winds from the west at 20 km/h. "
    "Tomorrow will be colder, with frost in the valleys and a high of 6 degrees.",
]
CORPUS = [p for p in PARAGRAPHS for _ in range(4)] + [
    " ".join(random.Random(i).sample(PARAGRAPHS[i % 3].split(), 20)) for i in range(60)]
SAMPLES = [
    "", " ", "  ", "\n", "Hello world", "  two leading spaces", "trailing spaces   ", "tabs\tand\t\ttabs",
    "line one\nline two\n\n\nline five", "windows\r\nline", "digits 1234567890 and 3.14159, -42",
    "CJK: 山水 日本語 한국어", "emoji 😈🤗 and 👩‍👩‍👧 family", "accents: café naïve Ærøskøbing",
    "<|begin_of_sentence|>User: hi\nAssistant: hello<|end_of_sentence|>", "<s>bos</s> and <unk> inline",
    "<mask:4>system<mask:5> <mask:1> masked", "almost special <|begin_of_sentence| and <mask:9>",
    "<|end_of_sentence|><|end_of_sentence|>", PARAGRAPHS[0], PARAGRAPHS[3], PARAGRAPHS[4],
]
CHATS = [
    [{"role": "user", "content": "Hey, are you conscious? Can you talk to me?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2? 😈 山"}],
    [{"role": "user", "content": "  spaces\tand\nnewlines  "}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    train_sentencepiece(CORPUS, 700, path)
    return path


@pytest.fixture(scope="module")
def tok(ckpt) -> Tokenizer:
    return Tokenizer.from_dir(ckpt)


@pytest.fixture(scope="module")
def hf_tokenizers(ckpt, tmp_path_factory):
    """transformers' two ways into an ERNIE checkpoint: LlamaTokenizer, and TokenizersBackend with config.json."""
    with_config = tmp_path_factory.mktemp("with_config")
    shutil.copytree(ckpt, with_config, dirs_exist_ok=True)
    (with_config / "config.json").write_text(json.dumps({"model_type": "ernie4_5", "vocab_size": 700}))
    llama = transformers.AutoTokenizer.from_pretrained(ckpt)
    backend = transformers.AutoTokenizer.from_pretrained(with_config)
    assert type(llama).__name__ == "LlamaTokenizer" and type(backend).__name__ == "TokenizersBackend"
    return {"LlamaTokenizer": llama, "TokenizersBackend": backend}


@pytest.fixture(scope="module")
def json_only(ckpt, hf_tokenizers, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("json_only")
    hf_tokenizers["LlamaTokenizer"].save_pretrained(path)
    (path / "tokenizer.model").unlink(missing_ok=True)
    assert (path / "tokenizer.json").is_file()
    return path


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    shutil.copytree(ckpt, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_written_files_follow_ernie_layout(ckpt, tok):
    expected = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>",
                "<mask:1>", "<mask:4>", "<mask:5>", "<mask:6>", "<mask:7>"]
    assert [tok.token_to_id(t) for t in expected] == list(range(10))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.cls_token == "<|begin_of_sentence|>" and tok.sep_token == "<|end_of_sentence|>"
    assert tok.mask_token == "<mask:1>" and (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (3, 4, 5)
    assert len(tok) == tok.vocab_size == 700 and tok.special_ids == frozenset(range(10))
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["padding_side"] == "left"
    assert not (config["legacy"] or config["add_prefix_space"] or config["add_bos_token"] or config["add_eos_token"])
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE and len(config["added_tokens_decoder"]) == 10
    special_map = json.loads((ckpt / "special_tokens_map.json").read_text())
    assert special_map["pad_token"] == "<unk>" and special_map["additional_special_tokens"][0] == "<mask:4>"
    assert tok.encode("\n") == [tok.token_to_id("<0x0A>")]  # newline is a byte token, as in ERNIE
    assert tok.encode("2024") == [tok.token_to_id(d) for d in "2024"]  # digits split one per token
    assert tok.encode("a  b")[1] == tok.token_to_id(" ")  # no space folding, no dummy prefix
    assert tok.encode("<mask:1>x<|end_of_sentence|>")[::2] == [5, 4]


@pytest.mark.parametrize("loader", ["LlamaTokenizer", "TokenizersBackend"])
def test_encode_decode_match_transformers(tok, hf_tokenizers, loader):
    hf = hf_tokenizers[loader]
    for text in SAMPLES + PARAGRAPHS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_byte_fallback_is_exercised(tok):
    ids = tok.encode("😈")
    assert len(ids) == 4 and all(tok.decode([i]) == "\ufffd" for i in ids)


def test_added_tokens_beyond_base_vocab(ckpt, tmp_path):
    """Like ERNIE's <|IMAGE_PLACEHOLDER|> (100295): ids past the SentencePiece vocabulary."""
    path = _copy(ckpt, tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    extra = {"700": ("<|IMAGE_PLACEHOLDER|>", True, False, False), "701": ("<|LOC_0|>", False, False, False),
             "702": ("<|LOC_SEP|>", True, True, True)}
    for i, (content, special, lstrip, rstrip) in extra.items():
        config["added_tokens_decoder"][i] = {"content": content, "special": special, "lstrip": lstrip,
                                             "rstrip": rstrip, "normalized": False, "single_word": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    assert len(ours) == len(hf) == 703
    for text in ["see <|IMAGE_PLACEHOLDER|> here", "box<|LOC_0|><|LOC_0|>", "a  <|LOC_SEP|>  b", "<|LOC_SEP|>\n"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_legacy_layout_with_added_tokens_json(ckpt, tmp_path):
    """Paddle-era files: no added_tokens_decoder, so special_tokens_map.json and added_tokens.json count."""
    path = _copy(ckpt, tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"], config["additional_special_tokens"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    special_map = json.loads((path / "special_tokens_map.json").read_text())
    # transformers 5.24 leaves an added_tokens.json token non-special when the list holding it is called
    # additional_special_tokens (the older name); we treat both names alike, so compare on the newer one.
    special_map["extra_special_tokens"] = special_map.pop("additional_special_tokens") + ["<|IMAGE_PLACEHOLDER|>"]
    (path / "special_tokens_map.json").write_text(json.dumps(special_map))
    (path / "added_tokens.json").write_text(json.dumps({"<|IMAGE_PLACEHOLDER|>": 700, "<|LOC_0|>": 701}))
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    assert len(ours) == len(hf) == 702 and ours.token_to_id("<mask:5>") == 7
    for text in ["a<|IMAGE_PLACEHOLDER|>b <|LOC_0|> <mask:5>x", SAMPLES[14], SAMPLES[16]]:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_chat_template_renders_spec_format(tok):
    expected = ("<|begin_of_sentence|>You are terse.\nUser: Hi\nAssistant: Hello!<|end_of_sentence|>"
                "User: 2+2? 😈 山\nAssistant: ")
    assert tok.apply_chat_template(CHATS[1]) == expected
    assert tok.apply_chat_template(CHATS[1], add_generation_prompt=False) == expected[:-len("Assistant: ")]
    assert tok.encode_chat(CHATS[1])[0] == tok.cls_token_id
    with pytest.raises(Exception, match="no role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("loader", ["LlamaTokenizer", "TokenizersBackend"])
def test_chat_matches_transformers(tok, hf_tokenizers, loader):
    hf = hf_tokenizers[loader]
    for chat in CHATS:
        for gen in (True, False):
            text = tok.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert tok.encode_chat(chat, add_generation_prompt=gen) == list(ids)


def test_chat_template_sources(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(path).chat_template == DEFAULT_CHAT_TEMPLATE  # none in checkpoint: ERNIE's
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    rendered = ours.apply_chat_template(CHATS[1])
    assert rendered == hf.apply_chat_template(CHATS[1], tokenize=False) == "[You are terse.][Hi][Hello!][2+2? 😈 山]"


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [detok.feed(i) for i in ids] + [detok.finish()]


def test_incremental_detokenization_matches_decode(tok, hf_tokenizers):
    hf = hf_tokenizers["TokenizersBackend"]
    for text in SAMPLES + PARAGRAPHS:
        ids = tok.encode(text)
        for skip in (False, True):
            full = tok.decode(ids, skip_special_tokens=skip)
            deltas = _stream(tok, ids, skip)
            assert "".join(deltas) == full
            for n in range(len(ids) + 1):  # every prefix: streamed text so far is final text, never broken
                assert full.startswith("".join(deltas[:n]))
                assert "\ufffd" not in "".join(deltas[:n])
        for n in range(len(ids) + 1):  # every prefix as a whole sequence, cut UTF-8 included
            assert "".join(_stream(tok, ids[:n])) == tok.decode(ids[:n]) == hf.decode(ids[:n])


def test_incremental_detokenization_of_random_ids(tok, hf_tokenizers):
    """Invalid byte runs too: a run is all U+FFFD if any byte in it is bad (tokenizers' rule)."""
    hf, rng = hf_tokenizers["LlamaTokenizer"], random.Random(0)
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    for _ in range(200):
        n = rng.randrange(1, 12)
        ids = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(len(tok)) for _ in range(n)]
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_tokenizer_json_only_directory(tok, json_only):
    fast = Tokenizer.from_dir(json_only)
    assert type(fast._backend).__name__ == "_TokenizersBackend" and len(fast) == len(tok)
    for text in SAMPLES + PARAGRAPHS:
        ids = tok.encode(text)
        assert fast.encode(text) == ids and fast.decode(ids) == tok.decode(ids)
        assert fast.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert fast.special_ids == tok.special_ids and fast.eos_token_id == tok.eos_token_id
    assert fast.encode_chat(CHATS[1]) == tok.encode_chat(CHATS[1])


def test_tokenizer_json_with_prefix_space(ckpt, tok, tmp_path):
    """A Llama tokenizer.json that adds a prefix space: its Strip decoder, streamed and whole."""
    transformers.LlamaTokenizer.from_pretrained(ckpt, add_prefix_space=True).save_pretrained(tmp_path)
    ours, hf = Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(1)
    random_ids = [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 8))] for _ in range(100)]
    for ids in [ours.encode(text) for text in SAMPLES] + random_ids:
        for skip in (False, True):
            streamed = "".join(_stream(ours, ids, skip))
            assert streamed == ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
    prefixed = ours.encode("Hello world")
    assert prefixed == hf.encode("Hello world", add_special_tokens=False) != tok.encode("Hello world")
    assert ours.decode(prefixed) == "Hello world"  # the prefix space is stripped again
    (tmp_path / "tokenizer.json").unlink()
    shutil.copy(ckpt / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="add_prefix_space=true"):  # SentencePiece path: ERNIE never does this
        Tokenizer.from_dir(tmp_path)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_or_pointer_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="tokenizer.model is not a valid SentencePiece model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(ValueError, match="git lfs pull"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_config_and_unknown_ids(ckpt, tok, tmp_path):
    path = _copy(ckpt, tmp_path)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(path)
    with pytest.raises(ValueError, match="token id 700 is not in"):
        tok.decode([5, 700])


def test_non_ernie_normalizer_is_refused(tmp_path):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "tokenizer"), vocab_size=600,
        model_type="bpe", byte_fallback=True, minloglevel=2)  # defaults: NFKC, dummy prefix, space folding
    with pytest.raises(ValueError, match="add the checkpoint's tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_training_rejects_impossible_vocab(tmp_path):
    with pytest.raises(ValueError, match="no room for merges"):
        train_sentencepiece(CORPUS, 200, tmp_path)
    with pytest.raises(ValueError, match="smaller vocab_size"):
        train_sentencepiece(PARAGRAPHS[:1], 5000, tmp_path)
