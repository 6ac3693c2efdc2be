"""The HTTP server as clients see it: a real `serve` process on 127.0.0.1, the official `openai` client.

One tiny checkpoint (a ~320-piece tokenizer trained on the text below, a random 2-layer miniature of
the 300B structure) and one server per module. Greedy output is checked against the reference
`ernie45.generate` loop; every other test checks API behaviour (stop, seeds, logprobs, keys, load).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ernie45 import GenerationConfig, generate, load_model
from ernie45.server_cli import DEFAULT_MODEL_DIR
from ernie45.tokenizer import Tokenizer

for _dependency in ("fastapi", "uvicorn"):  # the server's own (optional) dependencies
    pytest.importorskip(_dependency)
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

API_KEY = "sk-test-key"
TEXTS = [
    "The lighthouse keeper wrote in his log every night: wind from the north, sea calm, two ships passed. "
    "In winter the lamp burned for sixteen hours, and he climbed the stairs nine times before dawn.",
    "A small server answers questions one token at a time. It keeps a cache of keys and values for each "
    "request, hands the blocks back when a request ends, and never lets one slow client hold up the rest.",
    "Tomatoes need sun, water and patience. Plant them after the last frost, tie them to a stake, and pick "
    "them when they are red but still firm. Basil grows well beside them and keeps some insects away.",
]
CHAT = [{"role": "user", "content": "Tell me about the lighthouse keeper."}]


def make_checkpoint(path: Path, max_len: int = 192) -> Path:
    """Tokenizer + random float32 model, written as a checkpoint directory."""
    from ernie45.config import preset
    from ernie45.model import build_model, init_random
    from ernie45.tokenizer_train import train_sentencepiece
    from ernie45.weights import save_checkpoint

    tok = train_sentencepiece([t for t in TEXTS for _ in range(8)], 320, path)
    cfg = preset("mini-300B-A47B").replace(vocab_size=len(tok), num_hidden_layers=2, moe_layer_start_index=1,
                                           moe_layer_end_index=1, max_position_embeddings=max_len)
    save_checkpoint(init_random(build_model(cfg), seed=0, std=0.3), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, log: Path, *extra: str, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """`ernie45 serve` as a subprocess; returns it and its base URL once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "ernie45.server_cli", "serve", "--model", str(model), "--port", str(port),
           "--kv-cache-mb", "1", "--threads", "1", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not come up in {timeout}s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_all_blocks_free(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, "ernie45_kv_blocks_free") == metric(url, "ernie45_kv_blocks_total") and \
                metric(url, "ernie45_num_requests_running") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"KV blocks not all returned: {metric(url, 'ernie45_kv_blocks_free')} free of "
                         f"{metric(url, 'ernie45_kv_blocks_total')}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    proc, url = start_server(checkpoint, tmp_path_factory.mktemp("log") / "server.log", "--api-key", API_KEY,
                             "--served-model-name", "tiny")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref(checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin-wait on a busy machine (10x slower)
    yield load_model(checkpoint, dtype=torch.float32), Tokenizer.from_dir(checkpoint)
    torch.set_num_threads(threads)


def reference(model, prompt: list[int], max_tokens: int, stops: tuple[int, ...]) -> list[int]:
    return generate(model, prompt, GenerationConfig(max_new_tokens=max_tokens, stop_token_ids=stops))


def test_chat_greedy_matches_reference_generate(client, ref):
    model, tok = ref
    out = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=24)
    tokens = reference(model, tok.encode_chat(CHAT), 24, (tok.eos_token_id, tok.sep_token_id))
    ended = tokens[-1] in (tok.eos_token_id, tok.sep_token_id)
    assert out.choices[0].message.content == tok.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)
    assert out.choices[0].finish_reason == ("stop" if ended else "length")
    assert out.usage.completion_tokens == len(tokens) and out.usage.prompt_tokens == len(tok.encode_chat(CHAT))


def test_completion_stream_equals_non_stream_and_reference(client, ref):
    model, tok = ref
    prompt = "The lighthouse keeper wrote"
    kw = dict(model="tiny", prompt=prompt, temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert whole.choices[0].text == tok.decode(reference(model, tok.encode(prompt), 20, ()), skip_special_tokens=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_stream_has_role_then_content_and_usage(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=16)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_string_and_stop_token_ids(client, ref):
    model, tok = ref
    prompt = tok.encode("A small server answers")
    kw = dict(model="tiny", prompt=prompt, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = next(ch for ch in text[2:] if ch not in " \ufffd")  # random weights: mostly byte tokens (U+FFFD)
    for stream in (False, True):
        out = client.completions.create(**kw, stop=[stop], stream=stream)
        got = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        assert got == text[:text.index(stop)]
    tokens = reference(model, prompt, 24, ())
    out = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "stop_token_ids": [tokens[5]]}})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == tokens.index(tokens[5]) + 1


def test_seed_reproducible_and_n_samples_differ(client):
    kw = dict(model="tiny", messages=CHAT, temperature=1.0, top_p=0.95, max_tokens=16, n=2,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(seed=1234, **kw)
    b = client.chat.completions.create(seed=1234, **kw)
    c = client.chat.completions.create(seed=99, **kw)
    a, b, c = ([choice.message.content for choice in r.choices] for r in (a, b, c))
    assert a == b and len(a) == 2
    assert a[0] != a[1] and a != c


def test_logprobs_match_the_model(client, ref):
    model, tok = ref
    prompt = tok.encode("Tomatoes need sun")
    out = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=6, logprobs=3,
                                    extra_body={"ignore_eos": True})
    tokens = reference(model, prompt, 6, ())
    with torch.no_grad():
        logp = model(torch.tensor([prompt + tokens]))[0].float().log_softmax(-1)  # [T, V]
    expected = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(v, abs=1e-6)  # greedy = the top-1
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=4, logprobs=True,
                                          top_logprobs=2)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)


def test_models_health_metrics_and_api_key(server, client):
    assert httpx.get(server + "/health").status_code == 200  # no key needed
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(server + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_ratio", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_sum"):
        assert f"ernie45_{name}" in text


def test_disconnect_aborts_and_frees_blocks(server):
    aborted = metric(server, 'ernie45_request_success_total{finish_reason="abort"}')
    body = {"prompt": "The lighthouse", "max_tokens": 150, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = r.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data:")) >= 3
    wait_all_blocks_free(server)
    assert metric(server, 'ernie45_request_success_total{finish_reason="abort"}') == aborted + 1
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the server notices the disconnect all the same
        httpx.post(server + "/v1/completions", json={**body, "stream": False, "n": 16, "max_tokens": 170},
                   timeout=0.2, headers={"Authorization": f"Bearer {API_KEY}"})
    wait_all_blocks_free(server)
    assert metric(server, 'ernie45_request_success_total{finish_reason="abort"}') == aborted + 17


def test_32_concurrent_streaming_clients(server):
    """Bounded load: 32 clients x 3 streamed requests; no errors, and every KV block back afterwards."""
    async def one_client(aclient: openai.AsyncOpenAI, i: int) -> int:
        tokens = 0
        for j in range(3):
            stream = await aclient.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Client {i} request {j}: hello"}], max_tokens=8,
                temperature=0.7, seed=i * 10 + j, stream=True, stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            assert chunks[-1].usage is not None and [c for c in chunks if c.choices][-1].choices[0].finish_reason
            tokens += chunks[-1].usage.completion_tokens
        return tokens

    async def main() -> list[int]:
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as aclient:
            return await asyncio.wait_for(asyncio.gather(*(one_client(aclient, i) for i in range(32))), 120)

    assert all(0 < t <= 24 for t in asyncio.run(main()))
    wait_all_blocks_free(server)
    assert metric(server, "ernie45_request_errors_total") == 0


def test_serve_without_model_uses_the_embedded_default(tmp_path):
    assert (DEFAULT_MODEL_DIR / "config.json").is_file()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ernie45", "serve", "--port", str(port), "--threads", "1",
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["default_model"]
        out = httpx.post(url + "/v1/completions", timeout=60,
                         json={"model": "default_model", "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}).json()
        assert out["choices"][0]["text"]
    finally:
        stop_server(proc)
