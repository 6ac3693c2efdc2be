"""Training: loss goes down, MoE balancing, the MTP loss, exact resume, export, gradient accumulation.

All runs use a byte-level stand-in tokenizer (id = byte + 3) on a generated toy corpus, so they need
neither the corpus packages nor a trained SentencePiece model; the one test of the real tokenizer path
skips when ``ernie45.tokenizer_train`` is absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ernie45 import load_model
from ernie45.model import build_model, init_random
from ernie45.train.balance import RoutingMonitor, aux_loss, bias_update
from ernie45.train.corpus import Document, build_corpus
from ernie45.train.data import tokenize_corpus
from ernie45.train.loop import resolve_model_config, setup, train, train_step
from ernie45.train.mtp import mtp_loss, trunk

TINY = dict(model_type="ernie4_5_moe", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_num_experts=8, moe_k=2,
            moe_intermediate_size=16, moe_num_shared_experts=1, moe_layer_start_index=1, num_nextn_predict_layers=1,
            tie_word_embeddings=False, torch_dtype="float32")
FAST = dict(batch_size=4, seq_len=32, lr=3e-3, warmup=3, eval_every=10, eval_batches=2, save_every=100)
WORDS = "the king queen lord said unto them and thou hast art good evil light dark sea ship".split()
MTP_NAMES = ["model.mtp_emb_norm.0.weight", "model.mtp_hidden_norm.0.weight", "model.mtp_linear_proj.0.weight",
             "model.mtp_block.0.self_attn.q_proj.weight", "model.mtp_block.0.mlp.down_proj.weight",
             "model.mtp_block.0.post_attention_layernorm.weight"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster, and on a busy 2-core machine far faster (no spin-waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def byte_encode(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy-corpus")
    rng = np.random.default_rng(0)
    docs = [Document("toy", f"d{i}", "\n\n".join(" ".join(rng.choice(WORDS, 30)) for _ in range(40))) for i in range(8)]
    build_corpus(path, ["toy"], heldout_fraction=0.15, chunk_chars=800, readers={"toy": lambda: docs})
    tokenize_corpus(path, byte_encode, bos_id=1, eos_id=2, tokenizer_info={"vocab_size": 259})
    return path


def tiny_model(seed=0):
    return init_random(build_model(resolve_model_config(TINY, 260)), seed=seed).train()


def test_loss_decreases_with_moe_and_mtp(data_dir, tmp_path):
    result = train(data_dir, tmp_path, TINY, dict(FAST, steps=30), progress=False)
    rows = result and json.loads((tmp_path / "history.json").read_text())["train"]
    first, last = np.mean([r["lm_loss"] for r in rows[:3]]), np.mean([r["lm_loss"] for r in rows[-3:]])
    assert last < first - 1.0, (first, last)
    assert rows[-1]["mtp_loss"] < rows[0]["mtp_loss"] - 1.0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["last_eval"]["heldout_ppl"] < float(np.exp(first))


def test_bias_update_rule():
    bias = torch.zeros(1, 4)
    new = bias_update(bias, torch.tensor([10, 0, 5, 5]), rate=0.01)
    torch.testing.assert_close(new, torch.tensor([[-0.01, 0.01, 0.0, 0.0]]))  # over-loaded down, under up, mean stays


def test_overloaded_expert_gets_its_bias_lowered(data_dir, tmp_path):
    run = setup(data_dir, tmp_path, TINY, dict(FAST, steps=5, bias_update_rate=0.01), None)
    bias = run.model.model.layers[1].mlp.moe_statics.e_score_correction_bias
    with torch.no_grad():
        bias[0, 0] = 1.0  # expert 0 now wins every token's selection
    train_step(run)
    assert bias[0, 0].item() == pytest.approx(0.99)
    assert (bias[0, 1:] == 0.01).sum() >= 5  # experts under the mean load move up
    assert run.monitor.load[1].sum() == 0  # counts cleared after the update


def test_aux_loss_is_k_when_balanced_and_trains_the_router():
    E, k = 4, 2
    uniform = torch.full((8, E), 1 / E)
    assert aux_loss(uniform, k).item() == pytest.approx(k)
    model = tiny_model()
    monitor = RoutingMonitor(model, keep_probs=True)
    ids = torch.randint(3, 259, (2, 16))
    model(ids)
    loss = monitor.aux_loss()
    loss.backward()
    assert loss.item() >= k - 1e-6 and model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    monitor.close()
    assert "route" not in vars(model.model.layers[1].mlp)


def test_mtp_loss_equals_hand_computation():
    model = tiny_model()
    window = torch.randint(3, 259, (2, 16 + 2))  # T + 1 + 1
    T = 16
    hidden, positions = trunk(model, window, T)
    got = mtp_loss(model, hidden, window, positions)
    # by hand: logits for x_{t+2} from h_t (pre-norm) and x_{t+1}; mean negative log-likelihood
    h = model.model(window[:, :T], torch.arange(T).expand(2, T))
    assert torch.equal(h, hidden)
    logits = model.mtp_logits(h, window[:, 1:T + 1], torch.arange(T).expand(2, T))
    logp = logits.log_softmax(-1)
    expected = -logp.gather(-1, window[:, 2:T + 2, None]).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not torch.allclose(model.logits(h).log_softmax(-1), logp)  # not the next-token head


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


def test_exact_resume_is_bitwise(data_dir, tmp_path):
    settings = dict(FAST, steps=6, grad_accum=2, eval_every=2, aux_loss_coef=0.01, bias_update_rate=0.01)
    train(data_dir, tmp_path / "straight", TINY, settings, progress=False)
    train(data_dir, tmp_path / "split", TINY, dict(settings, stop_at=3), progress=False)
    assert not (tmp_path / "split" / "model.safetensors").exists()  # interrupted runs export nothing
    train(data_dir, tmp_path / "split", resume="latest", progress=False)  # stop_at is not carried over
    a, b = _tensors(tmp_path / "straight"), _tensors(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = load_file(str(tmp_path / "straight/checkpoints/step-00000006/optimizer.safetensors"))
    sb = load_file(str(tmp_path / "split/checkpoints/step-00000006/optimizer.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("state."))
    ha, hb = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("straight", "split"))
    assert ha == hb


def test_export_loads_in_ernie45_and_transformers(data_dir, tmp_path):
    from conftest import load_reference

    train(data_dir, tmp_path, TINY, dict(FAST, steps=3), progress=False)
    names = set(_tensors(tmp_path))
    assert set(MTP_NAMES) <= names and "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.moe_statics.e_score_correction_bias" in names
    ours, ref = load_model(tmp_path, dtype=torch.float32), load_reference(tmp_path)
    ids = torch.randint(3, 259, (2, 20))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert (tmp_path / "generation_config.json").is_file()


def test_gradient_accumulation_matches_bigger_batch(data_dir, tmp_path):
    runs = [setup(data_dir, tmp_path / str(i), TINY, dict(FAST, steps=5, clip=0.0, **kw), None)
            for i, kw in enumerate([dict(batch_size=4, grad_accum=1), dict(batch_size=2, grad_accum=2)])]
    rows = [train_step(r) for r in runs]
    assert rows[0]["lm_loss"] == pytest.approx(rows[1]["lm_loss"], rel=1e-5)
    for (name, p), q in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        else:  # the correction bias: same expert counts -> identical update
            assert torch.equal(p, q), name


def test_bf16_autocast_keeps_routing_fp32(data_dir, tmp_path):
    run = setup(data_dir, tmp_path, TINY, dict(FAST, steps=2, dtype="bf16"), None)
    row = train_step(run)
    assert np.isfinite(row["loss"])
    block = run.model.model.layers[1].mlp
    with run.autocast():
        probs, _, _ = block.route(torch.randn(5, 32))
    assert probs.dtype == torch.float32


def test_real_tokenizer_files_are_exported(tmp_path):
    pytest.importorskip("ernie45.tokenizer_train")
    from ernie45.tokenizer import Tokenizer
    from ernie45.train.data import prepare_tokens

    rng = np.random.default_rng(1)
    docs = [Document("toy", f"d{i}", "\n\n".join(" ".join(rng.choice(WORDS, 30)) for _ in range(40))) for i in range(6)]
    build_corpus(tmp_path / "data", ["toy"], heldout_fraction=0.2, chunk_chars=800, readers={"toy": lambda: docs})
    info = prepare_tokens(tmp_path / "data", vocab_size=300)
    assert info["tokenizer"]["vocab_size"] == 300 and info["train"]["max_id"] < 300
    model = {k: v for k, v in TINY.items() if k != "vocab_size"}  # taken from the tokenizer
    train(tmp_path / "data", tmp_path / "out", model, dict(FAST, steps=2), progress=False)
    tok = Tokenizer.from_dir(tmp_path / "out")
    assert tok.decode(tok.encode("the king said")) == "the king said"
    assert json.loads((tmp_path / "out/config.json").read_text())["vocab_size"] == 300


def test_cli_train_and_resume(data_dir, tmp_path, capsys):
    import argparse

    from ernie45.train.cli import register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": TINY, "train": dict(FAST, steps=4)}))
    base = ["train", "--data", str(data_dir), "--out", str(tmp_path / "out"), "--config", str(config), "--no-progress"]
    args = parser.parse_args(base + ["--stop-at", "2", "--lr", "1e-3"])
    assert args.func(args) == 0 and json.loads(capsys.readouterr().out)["step"] == 2
    args = parser.parse_args(["train", "--data", str(data_dir), "--out", str(tmp_path / "out"), "--resume",
                              "--no-progress"])
    assert args.func(args) == 0 and json.loads(capsys.readouterr().out)["step"] == 4
    saved = json.loads((tmp_path / "out/train_config.json").read_text())["train"]
    assert saved["lr"] == 1e-3 and saved["steps"] == 4 and (tmp_path / "out/model.safetensors").is_file()
    args = parser.parse_args(["data", "tokenize", "--data", str(data_dir)])
    with pytest.raises(ValueError, match="exactly one of"):
        args.func(args)
