from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from ernie45 import load_model
from ernie45.evaluate import perplexity, unigram_perplexity


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint("moe_shared_tied")[0], dtype=torch.float32)


def test_one_window_equals_direct_cross_entropy(model):
    ids = torch.randint(0, 99, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        nll = F.cross_entropy(model(torch.tensor([ids]))[0, :-1], torch.tensor(ids[1:]))
    got = perplexity(model, ids, window=64)
    assert got["tokens"] == 39 and math.isclose(got["perplexity"], math.exp(float(nll)), rel_tol=1e-5)


@pytest.mark.parametrize("window,stride", [(16, 8), (16, 16), (10, 3)])
def test_sliding_window_scores_every_token_once(model, window, stride):
    ids = torch.randint(0, 99, (57,), generator=torch.Generator().manual_seed(1)).tolist()
    got = perplexity(model, ids, window=window, stride=stride)
    assert got["tokens"] == 56
    # the first window's tokens see exactly their full-pass context; the rest at least window-stride tokens
    with torch.no_grad():
        first = F.cross_entropy(model(torch.tensor([ids[:window]]))[0, :-1], torch.tensor(ids[1:window]),
                                reduction="sum")
    head = perplexity(model, ids[:window], window=window, stride=stride)
    assert math.isclose(head["nll"] * head["tokens"], float(first), rel_tol=1e-5)


def test_unigram_baseline():
    assert math.isclose(unigram_perplexity([1, 1, 2, 2], [1, 2, 1], vocab_size=4), 8 / 3)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, [1, 2, 3], window=4, stride=8)
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity(model, [1])


def test_chat_loop_keeps_history_and_streams(tmp_path):
    from test_tokenizer import CORPUS

    from ernie45.chat import chat_loop
    from ernie45.config import preset
    from ernie45.generation import GenerationConfig
    from ernie45.model import build_model, init_random
    from ernie45.tokenizer_train import train_sentencepiece
    from ernie45.weights import save_checkpoint

    tok = train_sentencepiece(CORPUS, 400, tmp_path)
    cfg = preset("mini-300B-A47B").replace(vocab_size=len(tok), num_hidden_layers=3, moe_layer_end_index=2)
    save_checkpoint(init_random(build_model(cfg), seed=2, std=0.3), tmp_path)
    model = load_model(tmp_path)
    out = io.StringIO()
    seen = []
    import ernie45.chat as chat_mod
    original = chat_mod.reply

    def spy(model, tok, history, gcfg, out):
        seen.append([dict(m) for m in history])
        return original(model, tok, history, gcfg, out)

    chat_mod.reply = spy
    try:
        chat_loop(model, tok, GenerationConfig(max_new_tokens=6), system="Be brief.",
                  inp=io.StringIO("hello there\n/reset\nsecond\n/exit\nnever read\n"), out=out)
    finally:
        chat_mod.reply = original
    assert [m["role"] for m in seen[0]] == ["system", "user"]
    assert [m["content"] for m in seen[1]] == ["Be brief.", "second"]  # /reset kept only the system turn
    assert out.getvalue().count("\n") == 2
