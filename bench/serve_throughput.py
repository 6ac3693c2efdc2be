"""Aggregate generation throughput of `ernie45 serve` at 1, 8 and 32 concurrent streaming clients.

Writes a random-weight bench checkpoint once (the `mini-300B-A47B` miniature: 6 layers, 64 experts
top-8, with a small tokenizer trained on the text below), starts a real server process on 127.0.0.1
and, per concurrency level c, runs c clients that each stream `--requests` completions of
`--max-tokens` tokens (ignore_eos, so every request generates exactly that many). Throughput is
generated tokens / wall seconds across all clients; client-side TTFT and inter-chunk gaps are
reported too. Clients share the machine with the server, so on a small CPU they cost it some time;
the same work through `Engine.generate` alone (no HTTP) is measured afterwards for comparison.
Output: bench/results/serve_throughput.json and .md.

    python bench/serve_throughput.py [--dir /tmp/ernie45-serve-bench] [--threads N] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
LEVELS = (1, 8, 32)
TEXT = [
    "Benchmarks measure one thing at a time. This one sends many streamed requests to a local server and "
    "counts the tokens that come back each second, with every client waiting for its own answer.",
    "A river of requests, a pool of memory blocks, and a scheduler that decides each step which sequences "
    "run: that is all a serving engine is, give or take a few thousand lines of careful bookkeeping.",
]
PROMPT = "Write a short note about the river of requests and the pool of memory blocks."


def make_checkpoint(path: Path) -> None:
    from ernie45.config import preset
    from ernie45.model import build_model, init_random
    from ernie45.tokenizer_train import train_sentencepiece
    from ernie45.weights import save_checkpoint

    tok = train_sentencepiece([t for t in TEXT for _ in range(10)], 320, path)
    cfg = preset("mini-300B-A47B").replace(vocab_size=len(tok), max_position_embeddings=2048)
    save_checkpoint(init_random(build_model(cfg), seed=0), path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, threads: int | None, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ernie45.server_cli", "serve", "--model", str(model), "--port", str(port),
           "--max-num-seqs", "32", "--kv-cache-mb", "64", "--log-level", "warning"]
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


async def stream_one(client: httpx.AsyncClient, max_tokens: int) -> tuple[int, float, list[float]]:
    """One streamed completion: (tokens, seconds to first chunk, gaps between chunks)."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, stamps, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                stamps.append(time.perf_counter())
    return tokens, stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]


async def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        async def worker():
            return [await stream_one(client, max_tokens) for _ in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    gaps = [g for r in results for g in r[2]]
    ttft = statistics.median(r[1] for r in results)
    return {"concurrency": clients, "requests": len(results), "generated_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "ttft_median_s": round(ttft, 4),
            "chunk_gap_median_s": round(statistics.median(gaps), 4) if gaps else None}


def engine_alone(model_dir: Path, threads: int | None, max_tokens: int) -> dict[int, float]:
    """The same work without HTTP: c sequences through `Engine.generate` in this process (tokens/s)."""
    import torch

    from ernie45.engine import Engine
    from ernie45.sampling import SamplingParams
    from ernie45.tokenizer import Tokenizer
    from ernie45.weights import load_model

    if threads:
        torch.set_num_threads(threads)
    prompt = Tokenizer.from_dir(model_dir).encode(PROMPT)
    engine = Engine(load_model(model_dir), kv_cache_bytes=64 << 20, max_num_seqs=32)
    params = SamplingParams(temperature=0.8, max_tokens=max_tokens, ignore_eos=True)
    engine.generate({"warm-up": prompt}, params)
    out = {}
    for c in LEVELS:
        start = time.perf_counter()
        engine.generate({f"{c}-{i}": prompt for i in range(c)}, params)
        out[c] = round(c * max_tokens / (time.perf_counter() - start), 1)
    return out


def write_results(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_throughput.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}; torch {meta['torch']} ({meta['torch_threads']}); model: {meta['model']}; "
             f"{meta['max_tokens']} tokens per request, prompt {meta['prompt_tokens']} tokens.", "",
             "| concurrent streams | requests | generated tokens | wall s | tokens/s | median TTFT s | "
             "median chunk gap s | engine alone, tokens/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['requests']} | {r['generated_tokens']} | {r['wall_s']} | "
              f"{r['tokens_per_s']} | {r['ttft_median_s']} | {r['chunk_gap_median_s']} | "
              f"{r['engine_alone_tokens_per_s']} |" for r in rows]
    lines += ["", "tokens/s: generated tokens of all streams / wall time, through HTTP (SSE) with the clients on the "
              "same machine. Engine alone: the same number of sequences through `Engine.generate` in one "
              "process, no HTTP, no clients (one batch, so no arrival stagger)."]
    (RESULTS / "serve_throughput.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ernie45-serve-bench"))
    ap.add_argument("--threads", type=int, help="torch threads in the server (default: torch's choice)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=0, help="requests per client (default: 4 at c=1, 2 otherwise)")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    args = ap.parse_args()
    if not (args.dir / "config.json").is_file():
        make_checkpoint(args.dir)
    port = args.port or free_port()
    proc = start_server(args.dir, port, args.threads, args.dir / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(run_level(url, 1, 1, 8))  # warm-up
        rows = [asyncio.run(run_level(url, c, args.requests or (4 if c == 1 else 2), args.max_tokens))
                for c in LEVELS]
    finally:
        proc.terminate()
        proc.wait(30)
    import torch

    from ernie45.tokenizer import Tokenizer
    alone = engine_alone(args.dir, args.threads, args.max_tokens)
    rows = [{**r, "engine_alone_tokens_per_s": alone[r["concurrency"]]} for r in rows]
    meta = {"command": "python bench/serve_throughput.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
            "torch": torch.__version__,
            "torch_threads": f"{args.threads} threads" if args.threads else "default threads",
            "model": "random mini-300B-A47B (6 layers, hidden 128, 64 experts top-8), float32",
            "max_tokens": args.max_tokens, "prompt_tokens": len(Tokenizer.from_dir(args.dir).encode(PROMPT))}
    write_results(rows, meta)
    print((RESULTS / "serve_throughput.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
