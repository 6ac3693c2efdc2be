"""Static-shape decode (static_decode.py) and the device-id expert kernel (kernels/expert_rows.py) on CPU.

The CUDA graph itself needs a GPU (bench/gpu_speed.py runs it there); what runs here is every operation
that graph records, eagerly, held to the reference modules and the reference generate loop.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from ernie45 import GenerationConfig, generate, load_model
from ernie45.kernels import expert_rows as er
from ernie45.quant import quantize_model
from ernie45.quant.formats import dequantize, get_format, quantize_rtn
from ernie45.static_decode import GraphDecoder, StaticExperts, StaticKVCache, make_static


def _int4(E, N, K, group, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_rtn(torch.randn(E, N, K, generator=gen), get_format("int4"), group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_rows_reference_int4_matches_dequantized_weights(dtype):
    qw = _int4(5, 24, 256, 64)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    ids = torch.tensor([3, 0, 3, 4])
    got = er.expert_rows_reference(x, ids, qw.qweight, qw.scales, qw.zeros, 64)
    w = dequantize(qw).to(dtype)  # the reference route: fp32 dequantize, rounded to x's dtype
    want = torch.stack([(w[e].float() @ x[p].float()).to(dtype) for p, e in enumerate(ids.tolist())])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # fp32 sums of 256 terms in two orders


def test_expert_rows_float_weights():
    w, x, ids = torch.randn(6, 20, 64), torch.randn(3, 64), torch.tensor([5, 5, 1])
    torch.testing.assert_close(er.expert_rows(x, ids, w), torch.stack([w[5] @ x[0], w[5] @ x[1], w[1] @ x[2]]))


INTERPRETED = """
import sys, torch
from ernie45.kernels import expert_rows as er
from ernie45.quant.formats import get_format, quantize_rtn
torch.manual_seed(0)
x, ids = torch.randn(3, 128), torch.tensor([1, 0, 1])
if sys.argv[1] == "int4":
    qw = quantize_rtn(torch.randn(2, 40, 128), get_format("int4"), 64)  # 40 rows: a partial block of 32
    args = (qw.qweight, qw.scales, qw.zeros, 64)
else:
    args = (torch.randn(2, 40, 128),)
for dtype in (torch.float32, torch.bfloat16):
    got, want = er.expert_rows(x.to(dtype), ids, *args), er.expert_rows_reference(x.to(dtype), ids, *args)
    bf16 = dtype == torch.bfloat16  # one output rounding, sums in another order: a bf16 ulp apart at most
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if bf16 else 1e-5, atol=1e-3 if bf16 else 1e-4)
print("ok")
"""


@pytest.mark.skipif(er.triton is None and not os.environ.get("CI"),
                    reason="triton is not installed (pip install triton==3.6.0; CI installs it)")
@pytest.mark.parametrize("fmt", ["float", "int4"])
def test_triton_kernel_matches_reference_in_the_interpreter(fmt):
    """The Triton kernel run by Triton's CPU interpreter (set before the kernel is defined, so in a
    process of its own) against the torch gather."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED, fmt], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_static_cache_attends_like_the_growing_cache(hf_checkpoint):
    model = load_model(hf_checkpoint("moe_shared_tied")[0], dtype=torch.float32)
    static = StaticKVCache(model.config, 16, torch.float32, "cpu")
    from ernie45.cache import KVCache

    grow = KVCache(model.config, 1, 16, torch.float32, num_layers=model.config.num_hidden_layers)
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    with torch.no_grad():
        for cache in (static, grow):
            h = model.model(ids[:, :3], torch.arange(3)[None], cache)
            h2 = model.model(ids[:, 3:], torch.arange(3, 5)[None], cache)
            if cache is static:
                a = (h, h2)
    torch.testing.assert_close(a[0], h, rtol=1e-5, atol=1e-5)  # matmul order over 16 vs 3 slots
    torch.testing.assert_close(a[1], h2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["moe_shared_tied", "moe_noshared_untied_bias"])
def test_static_experts_equal_the_reference_sum(hf_checkpoint, name):
    model = load_model(hf_checkpoint(name)[0], dtype=torch.float32)
    block = next(l.mlp for l in model.model.layers if hasattr(l.mlp, "experts"))
    x = torch.randn(2, model.config.hidden_size)
    _, w, idx = block.route(x)
    want = block.experts(x, w, idx)
    got = StaticExperts(block.experts)(x, w, idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,quant", [("moe_shared_tied", None), ("moe_noshared_untied_bias", None),
                                        ("dense_untied", None), ("moe_shared_parallel", "int4"),
                                        ("dense_kv1_parallel", "int4")])
def test_graph_decoder_steps_equal_the_reference_generate_loop(hf_checkpoint, name, quant):
    model = load_model(hf_checkpoint(name)[0], dtype=torch.float32)
    if quant:
        quantize_model(model, quant, "rtn", progress=False)
    prompt, n = [3, 1, 4, 1, 5], 12
    want = generate(model, prompt, GenerationConfig(max_new_tokens=n, stop_token_ids=()))
    dec = GraphDecoder(make_static(copy.deepcopy(model)), max_len=32, use_graph=False)
    assert dec.generate(prompt, n) == want
    assert dec.generate(prompt[:2], n) == generate(model, prompt[:2], GenerationConfig(max_new_tokens=n,
                                                                                      stop_token_ids=()))
    with pytest.raises(ValueError, match="exceed max_len"):
        dec.decode(40)


def test_make_static_names_the_module_without_a_static_path(hf_checkpoint):
    model = load_model(hf_checkpoint("moe_shared_tied")[0], dtype=torch.float32)
    quantize_model(model, "int8", "rtn", progress=False)
    with pytest.raises(ValueError, match=r"model\.layers\.\d+\..*int8"):
        make_static(model)


# ---- on a CUDA device (skipped elsewhere; bench/gpu_speed.py's lease runs them) ------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _random_model(like: str, dtype: torch.dtype, device: str):
    """An ernie45-built random model (no transformers: the GPU image's version may differ)."""
    from ernie45.config import resolve_config
    from ernie45.model import build_model, init_random

    return init_random(build_model(resolve_config(like)), seed=0, std=0.08).to(dtype).to(device)


@needs_cuda
@pytest.mark.parametrize("int4", [False, True])
def test_triton_kernel_on_cuda_matches_reference(int4):
    torch.manual_seed(0)
    x, ids = torch.randn(8, 512, device="cuda").bfloat16(), torch.randint(0, 6, (8,), device="cuda")
    if int4:
        qw = _int4(6, 200, 512, 128)
        args = (qw.qweight.cuda(), qw.scales.cuda(), qw.zeros.cuda(), 128)
    else:
        args = (torch.randn(6, 200, 512, device="cuda").bfloat16(),)
    got = er.expert_rows(x, ids, *args)
    torch.testing.assert_close(got.float(), er.expert_rows_reference(x, ids, *args).float(), rtol=2e-2, atol=2e-2)


@needs_cuda
@pytest.mark.parametrize("quant", [None, "int4"])
def test_cuda_graph_decode_equals_eager_reference(quant):
    """fp32 on the GPU: the captured graph's greedy tokens are the reference loop's."""
    model = _random_model("mini-300B-A47B", torch.float32, "cuda")
    if quant:
        quantize_model(model, quant, "rtn", progress=False)
    prompt, n = [3, 1, 4, 1, 5, 9, 2, 6], 24
    cfg = GenerationConfig(max_new_tokens=n, stop_token_ids=())
    want, want_short = generate(model, prompt, cfg), generate(model, prompt[:3], cfg)  # reference modules
    dec = GraphDecoder(make_static(model), max_len=len(prompt) + n)  # the whole cache used
    assert dec.use_graph and dec.graph is not None
    assert dec.generate(prompt, n) == want
    assert dec.generate(prompt[:3], n) == want_short  # another prompt through the same graph


class _HostReads:
    """Records aten ops that CUDA graph capture forbids or would freeze: reading a tensor's value on the
    host (.item()/int(): `_local_scalar_dense`; ops whose output shape depends on data) and tensors made
    from Python data (`torch.tensor(...)`: `lift_fresh`, a host-to-device copy on a GPU)."""

    NAMES = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique2",
             "unique_consecutive", "repeat_interleave", "lift_fresh", "lift_fresh_copy"}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names, seen = self.NAMES, []
        self.seen = seen

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in names:
                    seen.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("name,quant", [("moe_shared_tied", None), ("moe_shared_parallel", "int4")])
def test_static_step_never_reads_a_tensor_on_the_host(hf_checkpoint, name, quant):
    """What a CUDA graph records must not sync: checked op by op on CPU. The reference step does sync
    (the growing cache's int(max), the grouped experts' counts), which shows the check sees it."""
    model = load_model(hf_checkpoint(name)[0], dtype=torch.float32)
    if quant:
        quantize_model(model, quant, "rtn", progress=False)
    from ernie45.cache import KVCache

    with _HostReads() as ref, torch.no_grad():
        model.model(torch.tensor([[5]]), torch.tensor([[0]]), KVCache(model.config, 1, 8, torch.float32))
    assert ref.seen
    dec = GraphDecoder(make_static(model), max_len=16, use_graph=False)
    dec.prefill([3, 1, 4])
    with _HostReads() as static:
        dec.step()
    assert static.seen == []
