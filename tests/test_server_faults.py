"""Bad input and faults: every client mistake is an OpenAI-style 4xx, a failing engine step is contained,
shutdown (SIGTERM, or the engine's own) ends requests cleanly and returns their KV blocks.

Uses its own server (no API key, a 64 KiB body limit); the SIGTERM test stops it and so runs last.
"""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
import torch
from test_server import TEXTS, httpx, make_checkpoint, start_server, stop_server  # skips without the server deps

from ernie45.async_engine import AsyncEngine
from ernie45.engine import Engine
from ernie45.sampling import SamplingParams
from ernie45.tokenizer import Tokenizer
from ernie45.weights import load_model

CHAT = [{"role": "user", "content": "hello"}]
BAD_REQUESTS = [  # (path, raw body or JSON object, expected status)
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"[1, 2]", 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": 2.5}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "top_k": -2}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "min_p": 1.5}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "presence_penalty": 3}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "frequency_penalty": -3}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "repetition_penalty": 0}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "n": 0}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "n": 1000}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "seed": 1.5}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10**12}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, 400),  # needs logprobs=true
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "stop": [""]}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "stop_token_ids": [-1]}, 400),
    ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-4"}, 404),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": " ".join(TEXTS * 3)}]}, 400),  # too long
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, 400),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1.0}}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 500}, 400),  # over the 192-token context
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400),
    ("/v1/completions", b"x" * 70_000, 413),
    ("/v1/nowhere", {}, 404),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("faults-ckpt"))


@pytest.fixture(scope="module")
def server_proc(checkpoint, tmp_path_factory):
    proc, url = start_server(checkpoint, tmp_path_factory.mktemp("log") / "server.log", "--max-body-mb", "0.0625")
    yield proc, url
    if proc.poll() is None:
        stop_server(proc)


@pytest.fixture(scope="module")
def server(server_proc):
    return server_proc[1]


@pytest.mark.parametrize("path, body, status", BAD_REQUESTS,
                         ids=lambda x: str(x)[:40] if isinstance(x, (str, bytes)) else None)
def test_bad_input_is_an_openai_error(server, path, body, status):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_chunked_oversized_body_is_413(server):
    def chunks():
        for _ in range(20):
            yield b" " * 8192

    r = httpx.post(server + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_openapi_fuzzing_never_gives_5xx(server):
    """Schemathesis: valid and invalid requests generated from the server's own OpenAPI schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    strategies = [result.ok().as_strategy(mode) for result in schema.get_all_operations()
                  for mode in schemathesis.GenerationMode]

    @settings(max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies))
    def check(case):
        if isinstance(case.body, dict) and "messages" in case.body:  # chat's default runs to the end of the
            case.body.setdefault("max_tokens", 4)  # context (~2 s here); keep the fuzzing about the API
        response = case.call(base_url=server, timeout=60)
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.text}"

    check()
    assert httpx.get(server + "/health").status_code == 200


@pytest.fixture(scope="module")
def tiny_engine(checkpoint):
    torch.set_num_threads(1)
    return load_model(checkpoint, dtype=torch.float32), Tokenizer.from_dir(checkpoint)


async def _run(aengine: AsyncEngine, prompt: list[int], max_tokens: int) -> list:
    stream = await aengine.submit([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [event async for event in stream]


def test_a_failing_step_fails_its_requests_and_the_loop_keeps_serving(tiny_engine):
    model, tok = tiny_engine
    engine = Engine(model, block_size=4, num_blocks=64)
    aengine, calls = AsyncEngine(engine, tok), {"n": 0}
    real_forward = model.model.forward

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device fault")
        return real_forward(*args, **kwargs)

    async def main():
        model.model.forward = flaky_forward
        aengine.start()
        try:
            failed = await _run(aengine, [5, 6, 7], 8)
            ok = await _run(aengine, [5, 6, 7], 8)
        finally:
            aengine.shutdown()
            del model.model.forward
        return failed, ok

    failed, ok = asyncio.run(main())
    assert failed[-1].finish_reason == "error" and "simulated device fault" in failed[-1].error
    assert [e.finish_reason for e in ok][-1] == "length" and len(ok) == 8
    assert engine.pool.num_free_blocks == 64 and not engine.has_unfinished()


def test_engine_shutdown_ends_running_requests_with_an_error(tiny_engine):
    model, tok = tiny_engine
    engine = Engine(model, block_size=4, num_blocks=64)
    aengine = AsyncEngine(engine, tok)

    async def main():
        aengine.start()
        stream = await aengine.submit([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
        events = []
        async for event in stream:
            events.append(event)
            if len(events) == 2:
                await asyncio.get_running_loop().run_in_executor(None, aengine.shutdown)
        return events

    events = asyncio.run(main())
    assert events[-1].finish_reason == "error" and "shutting down" in events[-1].error and len(events) < 150
    assert engine.pool.num_free_blocks == 64 and not aengine.alive


def test_sigterm_lets_a_running_stream_finish_then_exits(server_proc):
    proc, url = server_proc
    body = {"prompt": "The lighthouse", "max_tokens": 60, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
    events = [json.loads(line[5:]) for line in [first, *rest[:-1]]]
    assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
    assert proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
