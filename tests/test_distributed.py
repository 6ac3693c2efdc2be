"""TP / EP on torch.distributed (gloo, CPU): sharded logits and tokens equal the single process's.

Every multi-process case is a real `torchrun` (or plain env:// launch) of separate processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ernie45 import GenerationConfig, generate, load_model
from ernie45.config import preset
from ernie45.distributed import check_plan
from ernie45.model import build_model, init_random
from ernie45.weights import save_checkpoint

WORKER = str(Path(__file__).with_name("dist_worker.py"))
IDS = torch.tensor([[1, 5, 9, 14, 77, 3, 42, 8, 60, 21, 2, 98]])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("name,tp,ep", [("moe_shared_parallel", 2, 1), ("moe_shared_parallel", 1, 2),
                                        ("moe_shared_parallel", 2, 2), ("dense_kv1_parallel", 2, 1)])
def test_sharded_logits_tokens_and_bytes(hf_checkpoint, tmp_path, name, tp, ep):
    path, _ = hf_checkpoint(name)
    torchrun(tp * ep, WORKER, str(path), str(tp), str(ep), str(tmp_path / "out.safetensors"))
    got = load_file(tmp_path / "out.safetensors")
    single = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        assert (got["logits"] - single(IDS)).abs().max().item() <= 1e-5
    expected = generate(single, [1, 5, 9, 14], GenerationConfig(max_new_tokens=32, stop_token_ids=()))
    assert got["tokens"].tolist() == expected
    _assert_planner_bytes(single.config, tp, ep, got["bf16_bytes"].tolist())


def _assert_planner_bytes(cfg, tp, ep, per_rank):
    """Per-rank weight bytes (bf16 load) equal the planner's per-GPU weight bytes for the same layout."""
    from ernie45.plan_parallel import Layout, Placement, Workload

    (stage,) = Placement(cfg, Workload(scheme="bf16")).stage_weights(Layout(tp=tp, ep=ep))
    assert max(per_rank) == sum(stage.gpu.values()), (per_rank, stage.gpu)


def test_cli_generate_under_torchrun_equals_single_process(hf_checkpoint):
    path, _ = hf_checkpoint("moe_shared_parallel")
    args = ["generate", "--model", str(path), "--prompt-ids", "1,5,9", "--max-new-tokens", "16", "--ignore-eos",
            "--json", "--dtype", "float32"]
    proc = torchrun(4, "-m", "ernie45", *args, "--tp", "2", "--ep", "2")
    single = generate(load_model(path, dtype=torch.float32), [1, 5, 9],
                      GenerationConfig(max_new_tokens=16, stop_token_ids=()))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"token_ids": single}


def test_two_nodes_on_loopback(hf_checkpoint):
    """Two torchrun agents (--nnodes 2) on 127.0.0.1 give the same tokens as one process."""
    path, _ = hf_checkpoint("moe_shared_parallel")
    port = str(free_port())
    gen = ["-m", "ernie45", "generate", "--model", str(path), "--prompt-ids", "1,5,9", "--max-new-tokens", "8",
           "--ignore-eos", "--json", "--dtype", "float32", "--ep", "2"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port, *gen],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for r in (0, 1)]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    single = generate(load_model(path, dtype=torch.float32), [1, 5, 9],
                      GenerationConfig(max_new_tokens=8, stop_token_ids=()))
    assert json.loads(outs[0][0].strip().splitlines()[-1]) == {"token_ids": single}


def _env_launch(rank: int, world: int, port: int, args: list[str]) -> subprocess.Popen:
    env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return subprocess.Popen([sys.executable, "-m", "ernie45", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_killed_rank_ends_the_survivor_with_a_clear_message(tmp_path):
    cfg = preset("mini-300B-A47B").replace(num_hidden_layers=3, moe_layer_end_index=2, max_position_embeddings=1 << 20)
    path = save_checkpoint(init_random(build_model(cfg), seed=0, std=0.2), tmp_path / "long")
    args = ["generate", "--model", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "500000", "--ignore-eos",
            "--json", "--ep", "2", "--dist-timeout", "30"]
    port = free_port()
    ranks = [_env_launch(r, 2, port, args) for r in (0, 1)]
    time.sleep(12)  # both loaded and generating (or still starting: either way the survivor must stop)
    ranks[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = ranks[0].communicate(timeout=90)
    assert time.monotonic() - killed_at < 60
    assert ranks[0].returncode == 1 and "rank 0: distributed job failed" in err, err[-2000:]
    assert "Another rank probably died" in err or "rendezvous" in err


def test_rendezvous_timeout_is_reported(hf_checkpoint):
    path, _ = hf_checkpoint("moe_shared_parallel")
    start = time.monotonic()
    alone = _env_launch(0, 2, free_port(), ["generate", "--model", str(path), "--prompt-ids", "1", "--ep", "2",
                                            "--dist-timeout", "5"])
    _, err = alone.communicate(timeout=120)
    assert alone.returncode == 1 and "rendezvous at 127.0.0.1" in err and "timed out after 5 s" in err, err[-2000:]
    assert time.monotonic() - start < 60


def test_world_size_mismatch_and_divisibility_errors(hf_checkpoint):
    with pytest.raises(ValueError, match="8 experts cannot be split evenly over ep=3"):
        check_plan(load_model(hf_checkpoint("moe_shared_parallel")[0]).config, 1, 3)
    with pytest.raises(ValueError, match="attention heads 64 are not divisible by tp=3"):
        check_plan(preset("ERNIE-4.5-300B-A47B"), 3, 1)
    with pytest.raises(ValueError, match="ep=2 needs an MoE model"):
        check_plan(preset("ERNIE-4.5-0.3B"), 1, 2)
    with pytest.raises(ValueError, match="quantized checkpoints cannot be sharded yet"):
        check_plan(preset("ERNIE-4.5-21B-A3B").replace(quantization_config={"scheme": "int4"}), 2, 1)
    proc = subprocess.run([sys.executable, "-m", "ernie45", "generate", "--model", "x", "--prompt-ids", "1",
                           "--tp", "2"], capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 2 and "launched with 1 process(es) but --tp 2 x --ep 1 = 2" in proc.stderr


def test_serve_under_torchrun_rank0_broadcasts_steps(tmp_path):
    """`torchrun ... -m ernie45 serve --tp 2`: rank 0 serves HTTP; greedy completions equal one process's."""
    import httpx
    from test_server import make_checkpoint

    from ernie45.tokenizer import Tokenizer

    path = make_checkpoint(tmp_path / "ckpt")
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "ernie45",
                             "serve", "--model", str(path), "--port", str(port), "--tp", "2", "--dtype", "float32",
                             "--kv-cache-mb", "1", "--threads", "1", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        tok, model = Tokenizer.from_dir(path), load_model(path, dtype=torch.float32)
        for prompt in ("The lighthouse keeper wrote", "Waves"):
            body = {"model": "ckpt", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            got = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
            assert "choices" in got, got
            ids = generate(model, tok.encode(prompt), GenerationConfig(max_new_tokens=12, stop_token_ids=()))
            assert got["choices"][0]["text"] == tok.decode(ids, skip_special_tokens=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun's agent prints its own SignalException traceback
        proc.wait(60)
    text = (tmp_path / "serve.log").read_text()
    assert "distributed job failed" not in text and "DistributedError" not in text, text[-3000:]
