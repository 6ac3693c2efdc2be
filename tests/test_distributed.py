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
from ernie45.config import ModelConfig, preset
from ernie45.distributed import ParallelPlan, check_plan
from ernie45.model import build_model, init_random
from ernie45.quant import set_path
from ernie45.quant.stream import quantize_checkpoint
from ernie45.weights import save_checkpoint

WORKER = str(Path(__file__).with_name("dist_worker.py"))
QUANT_WORKER = str(Path(__file__).with_name("dist_quant_worker.py"))
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


# ---- quantized checkpoints -----------------------------------------------------------------------
# Row-parallel input widths (q_dim 512, dense 256, expert 256, shared 512) split 2 ways (shared: 4) into
# whole int4 groups (128), int2 groups (64) and fp8 128x128 blocks; KV rows 2 x 128 keep fp8 blocks whole.
# hidden 64 < 128 gives int4 a fallback group of 64 on the unsplit inputs. MTP is quantized and sharded too.
QUANT_TINY = dict(model_type="ernie4_5_moe", vocab_size=99, hidden_size=64, intermediate_size=256,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=128, moe_num_experts=4,
                  moe_k=2, moe_intermediate_size=256, moe_num_shared_experts=2, moe_layer_start_index=1,
                  tie_word_embeddings=False, num_nextn_predict_layers=1, torch_dtype="float32",
                  max_position_embeddings=512)
QUANT_SCHEMES = ("int8", "int4", "int2", "fp8", "mixed-2bit")  # mixed-2bit: int8 + int4 (MoE layer 0) + int2


@pytest.fixture(scope="module")
def quant_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """scheme -> a round-to-nearest quantized checkpoint of one tiny random float checkpoint."""
    root = tmp_path_factory.mktemp("quant-parallel")
    model = init_random(build_model(ModelConfig.from_dict(QUANT_TINY)), seed=0, std=0.1)
    save_checkpoint(model, root / "float")
    for scheme in QUANT_SCHEMES:
        quantize_checkpoint(root / "float", root / scheme, scheme, int4_moe_layers=1, progress=False)
    return {scheme: root / scheme for scheme in QUANT_SCHEMES}


def _reassembles(full: torch.Tensor, parts: list[list[torch.Tensor]]) -> bool:
    """parts[ep_rank][tp_rank] put back together in one of the plan's layouts equal `full` byte for byte:
    replicated; split over TP inside each EP group; experts split over EP (dim 0) and each whole or split
    over TP inside (int8 scales of a row-parallel weight stay whole); split over all ranks (shared experts)."""
    def same(ts: list[torch.Tensor]) -> bool:
        return all(t.shape == ts[0].shape and torch.equal(t, ts[0]) for t in ts)

    def cat(ts: list[torch.Tensor], d: int) -> torch.Tensor | None:
        try:
            return torch.cat(ts, d)
        except RuntimeError:  # shapes do not line up along d
            return None

    target = full.contiguous().view(torch.uint8)
    byte_parts = [[p.contiguous().view(torch.uint8) for p in group] for group in parts]
    world = [p for group in byte_parts for p in group]
    layouts = [world[0] if same(world) else None]  # replicated
    if all(same(group) for group in byte_parts):  # whole inside each EP group, experts split over EP
        layouts.append(cat([group[0] for group in byte_parts], 0))
    for d in range(target.dim()):
        groups = [cat(group, d) for group in byte_parts]
        if None not in groups:
            layouts += [groups[0] if same(groups) else None, cat(groups, 0)]  # TP inside EP; experts over EP
        layouts.append(cat(world, d))  # over every rank (shared experts)
    return any(t is not None and same([t, target]) for t in layouts)


@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_quantized_rank_tensors_are_checkpoint_slices_and_planner_bytes(quant_checkpoints, scheme):
    """Every rank's qweight/scales/zeros are byte-identical slices of the checkpoint's (no re-quantization),
    and each rank holds exactly the planner's per-GPU weight bytes for the scheme (bf16 elsewhere)."""
    from ernie45.plan_parallel import Layout, Placement, Workload

    path = quant_checkpoints[scheme]
    full = dict(load_model(path, dtype=torch.bfloat16).named_parameters())
    place = Placement(ModelConfig.from_file(path), Workload(scheme=scheme, mtp=True, int4_moe_layers=1))
    for tp, ep in ((2, 1), (1, 2), (2, 2)):
        ranks = [dict(load_model(path, dtype=torch.bfloat16, transform=ParallelPlan(tp, ep, r)).named_parameters())
                 for r in range(tp * ep)]
        assert {n for n in full if n.endswith(".qweight")} <= set(ranks[0])
        for name, tensor in full.items():
            parts = [[ranks[e * tp + t][name] for t in range(tp)] for e in range(ep)]
            assert _reassembles(tensor, parts), (tp, ep, name, [list(p.shape) for g in parts for p in g])
        (stage,) = place.stage_weights(Layout(tp=tp, ep=ep))
        per_rank = [sum(p.numel() * p.element_size() for p in r.values()) for r in ranks]
        assert max(per_rank) == sum(stage.gpu.values()), (tp, ep, per_rank, stage.gpu)


def test_quantized_split_that_cuts_a_group_is_refused(quant_checkpoints):
    """tp=4 fits the heads and widths, but not int4 groups (256 / 4 = 64 < 128) or fp8 blocks."""
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj input 256 / tp 4 = 64 is not a multiple "
                                         r"of int4 group 128") as e:
        load_model(quant_checkpoints["int4"], transform=ParallelPlan(4, 1, 0))
    assert "model.layers.1.mlp.experts.down_proj input 256 / tp 4 = 64" in str(e.value)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts.gate_proj output 256 / tp 4 = 64 is not a "
                                         r"multiple of fp8 block rows 128"):
        load_model(quant_checkpoints["fp8"], transform=ParallelPlan(4, 1, 3))
    load_model(quant_checkpoints["int8"], transform=ParallelPlan(4, 1, 1))  # per-row scales: any cut
    from ernie45.plan_parallel import Layout, layout_errors
    assert layout_errors(ModelConfig.from_file(quant_checkpoints["int4"]), Layout(tp=4), "int4")  # planner agrees


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_quantized_sharded_logits_and_tokens(quant_checkpoints, tmp_path, tp, ep):
    """One torchrun per plan, every scheme. On the reference matmul path the sharded model computes the
    single process's logits up to fp32 summation order, and the same greedy tokens. The CPU kernels round
    each partial sum to bf16, so there the sharded logits only stay as close to the reference as the
    single process's own kernel output does (int2 drifts furthest)."""
    torchrun(tp * ep, QUANT_WORKER, str(tp), str(ep), str(tmp_path), *map(str, quant_checkpoints.values()))
    for scheme, path in quant_checkpoints.items():
        got = load_file(tmp_path / f"{path.name}.safetensors")
        single = load_model(path, dtype=torch.float32)
        with torch.no_grad():
            auto = single(IDS)
            ref = set_path(single, "reference")(IDS)
        assert (got["ref_logits"] - ref).abs().max().item() <= 1e-5, scheme
        tokens = generate(single, [1, 5, 9, 14], GenerationConfig(max_new_tokens=16, stop_token_ids=()))
        assert got["ref_tokens"].tolist() == tokens, scheme
        kernel_error = (auto - ref).abs().max().item()
        assert (got["auto_logits"] - ref).abs().max().item() <= 2 * kernel_error + 1e-5, (scheme, kernel_error)
