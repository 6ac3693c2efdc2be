"""CPU decode kernels (gemv.c), compiled on first use and called through ctypes.

Why: a decode step reads every active weight once, so its speed is memory bandwidth. torch's CPU GEMV
is fine for fp32, but without native bf16 its bf16 GEMV is compute-bound (field-notes: ~5.5 G weights/s)
and its weight-only int8/int4 kernels want bf16 activations; a loop over experts also costs many small
torch calls per token. gemv.c reads bf16 weights with fp32 activations, int8/int4/int2 codes with
activations rounded to int16 per block (integer dot products, each element off by at most 1/32767 of
its block's largest value, exact for bf16 values near it: gemv.c's header), and runs a token's selected
experts in one call.

Build: `gcc -O3 -mavx2 -mfma -ffp-contract=off -fopenmp -shared decode.c` (which includes gemv.c, moe.c and
head.c; plus the AVX-512 VNNI flags where the CPU has them: `isa()`) into `$ERNIE45_KERNEL_CACHE`
(default `~/.cache/ernie45/kernels`), keyed by the sources' and flags' hash; the library links `libgomp.so.1`, which resolves to the OpenMP runtime torch already loaded, so both share one
thread pool. No compiler, no AVX2/FMA, or
`ERNIE45_KERNELS=0` -> `available()` is False with the reason in `unavailable_reason()`, and callers use
their torch paths.

Shapes: M activation rows, K in features, N out features, E experts, D hidden, F expert width.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode.c")  # includes gemv.c, moe.c, head.c: one library
SOURCES = (SOURCE, *(Path(__file__).with_name(f) for f in ("gemv.c", "moe.c", "head.c")))
KINDS = {torch.float32: 0, torch.bfloat16: 1, "int8": 2, "int4": 3, "int2": 4}
MAX_ROWS = 64  # gemv.c's MAX_ROWS
K_ALIGN = 16  # the plain kernels consume 16 columns per iteration

_lib: ctypes.CDLL | None = None
_reason: str | None = None


class WView(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("ld", ctypes.c_long), ("s", ctypes.c_void_p), ("z", ctypes.c_void_p),
                ("sld", ctypes.c_long), ("kind", ctypes.c_int), ("group", ctypes.c_int)]


_flags: frozenset[str] | None = None


def cpu_flags() -> frozenset[str]:
    """The vector-feature flags of this CPU from /proc/cpuinfo (empty when it cannot be read)."""
    global _flags
    if _flags is None:
        try:
            line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        except OSError:
            line = ""
        _flags = frozenset(line.partition(":")[2].split())
    return _flags


def _cpu_ok() -> str | None:
    flags = cpu_flags()
    if not flags:
        return "cannot read /proc/cpuinfo to check for AVX2/FMA"
    missing = [f for f in ("avx2", "fma") if f not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


ISA_FLAGS = {  # instruction set -> (CPU flags it needs, compiler flags)
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma")),
    # integer dot products with vpdpwssd / vpdpbusd (gemv.c's VNNI); auto-vectorised code stays 256-bit
    "avx512vnni": (("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
                   ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                    "-mprefer-vector-width=256")),
}


def isa() -> str:
    """The instruction set the kernels are built for: the best this CPU has, or `$ERNIE45_KERNEL_ISA`.

    Both builds compute bit-identical results (gemv.c's VNNI note); the override exists to compare them
    (tests, benchmarks) and to rule one out. Asking for one the CPU lacks raises ValueError.
    """
    want = os.environ.get("ERNIE45_KERNEL_ISA", "")
    if want:
        if want not in ISA_FLAGS:
            raise ValueError(f"ERNIE45_KERNEL_ISA={want!r}: choose one of {', '.join(ISA_FLAGS)} (or unset it)")
        missing = [f for f in ISA_FLAGS[want][0] if f not in cpu_flags()]
        if missing:
            raise ValueError(f"ERNIE45_KERNEL_ISA={want}: this CPU lacks {', '.join(missing)}; unset it")
        return want
    return "avx512vnni" if all(f in cpu_flags() for f in ISA_FLAGS["avx512vnni"][0]) else "avx2"


def _build() -> ctypes.CDLL:
    flags = ISA_FLAGS[isa()][1]
    src = b"".join(p.read_bytes() for p in SOURCES) + " ".join(flags).encode()
    cache = Path(os.environ.get("ERNIE45_KERNEL_CACHE", Path.home() / ".cache" / "ernie45" / "kernels"))
    lib = cache / f"gemv-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not lib.exists():
        cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
        if cc is None:
            raise RuntimeError("no C compiler (gcc) on PATH; install gcc to enable the fast decode kernels")
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        # -ffp-contract=off: a*b+c stays two roundings, as in torch's elementwise ops (decode.c)
        cmd = [cc, "-O3", *flags, "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", str(SOURCE),
               "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {SOURCE.name} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, lib)  # atomic: concurrent first uses never load a half-written library
    handle = ctypes.CDLL(str(lib))
    handle.ernie45_gemv.restype = None
    handle.ernie45_moe_token.restype = None
    handle.ernie45_decode.restype = None
    handle.ernie45_greedy_step.restype = ctypes.c_long
    if handle.ernie45_decode_phases() != len(DECODE_PHASES):
        raise RuntimeError("decode.c's phases and kernels.DECODE_PHASES disagree")
    handle.ernie45_head_screen.restype = ctypes.c_float
    handle.ernie45_head_screen_rows.restype = None
    handle.ernie45_paged_attention.restype = None
    handle.ernie45_head_pick_rows.restype = None
    handle.ernie45_head_candidates.restype = ctypes.c_long
    handle.ernie45_head_exact.restype = ctypes.c_long
    handle.ernie45_rms_norm.restype = None
    handle.ernie45_moe_tokens.restype = None
    return handle


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; None when unavailable."""
    global _lib, _reason
    if _lib is None and _reason is None:
        if os.environ.get("ERNIE45_KERNELS", "1") == "0":
            _reason = "disabled by ERNIE45_KERNELS=0"
        else:
            _reason = _cpu_ok()
            if _reason is None:
                try:
                    _lib = _build()
                except (RuntimeError, OSError, ValueError) as e:
                    _reason = str(e)
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _reason


# ---- weight views --------------------------------------------------------------------------------
class Weights:
    """A kernel's view of weight rows [*lead, N, K] of one kind, with fp32 scales/zeros kept alive.

    `data` is the tensor holding the rows (fp32, bf16, int8 or packed uint8); `scales`/`zeros` as stored
    (int8: [*lead, N]; int4/int2: [*lead, N, K/group]). `expert_strides()` gives the per-expert offsets
    of stacked weights.
    """

    def __init__(self, kind, data: torch.Tensor, in_features: int, scales: torch.Tensor | None = None,
                 zeros: torch.Tensor | None = None, group: int = 0):
        self.kind, self.in_features, self.group = KINDS[kind], in_features, group
        self.data = data.contiguous()
        self.scales = None if scales is None else scales.float().contiguous()
        self.zeros = None if zeros is None else zeros.float().contiguous()
        self.out_features = data.shape[-2]
        self.view = WView(self.data.data_ptr(), self.data.shape[-1] * self.data.element_size(),
                          0 if self.scales is None else self.scales.data_ptr(),
                          0 if self.zeros is None else self.zeros.data_ptr(),
                          self.scales.shape[-1] if self.packed else 0, self.kind, group)

    @property
    def packed(self) -> bool:
        return self.kind >= 3

    @property
    def nbytes(self) -> int:
        """Bytes stored for these rows (codes, scales and zeros as the kernels read them)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.zeros) if t is not None)

    @property
    def integer(self) -> bool:
        """int8/int4/int2: dot products in integers on int16-rounded activations (gemv.c's header)."""
        return self.kind >= 2

    @property
    def tiled(self) -> bool:
        """int8, and int4 with groups of 64k columns: gemv.c's dot_i8_tile / dot_q4_tile take any number of
        activation rows in tiles, at the speed of torch's own GEMM routes for these weights
        (bench/kernel_ab.py --rows), so callers need no row limit."""
        return self.kind == KINDS["int8"] or (self.kind == KINDS["int4"] and self.group % 64 == 0)

    def expert_strides(self) -> tuple[int, int]:
        """(bytes, scale elements) between consecutive stacked experts."""
        w = self.data.stride(0) * self.data.element_size()
        s = 0 if self.scales is None else self.scales.stride(0)
        return w, s


def supports(kind, in_features: int, group: int = 0) -> bool:
    """Whether the kernels take this weight: K a multiple of 16; packed groups whole 16-byte chunks."""
    if kind not in KINDS or in_features % K_ALIGN:
        return False
    if KINDS[kind] >= 3:
        chunk = 32 if KINDS[kind] == 3 else 64  # codes in 16 bytes
        return group > 0 and group % chunk == 0 and in_features % group == 0
    return True


ACT_BLOCK = 64  # gemv.c's ACT_BLOCK: columns per activation step for int8 weights


def activation_block(w: Weights) -> int:
    """Columns that share one int16 step when x meets these (integer-kind) weights."""
    return ACT_BLOCK if w.kind == KINDS["int8"] else w.group


def round_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """The integer kernels' rounding of activation rows x [M, K], in torch (the reference gemv.c is
    tested against): per block of `block` columns, max |x| = f * 2^e (0.5 <= f < 1) gives the step
    2^(e - 15); x / step is rounded half to even and saturated to [-32768, 32767]; blocks whose max is
    below 2^-100 become zero. Returns the rounded values (fp32, [M, K])."""
    x = x.float()
    M, K = x.shape
    nb = -(-K // block)
    xb = torch.nn.functional.pad(x, (0, nb * block - K)).view(M, nb, block)
    mx = xb.abs().amax(-1, keepdim=True)
    step = torch.ldexp(torch.ones_like(mx), torch.frexp(mx).exponent - 15)
    out = torch.round(xb / step).clamp(-32768, 32767) * step
    return torch.where(mx < 2.0 ** -100, torch.zeros_like(out), out).view(M, -1)[:, :K]


_NO_SCRATCH = torch.empty(1)  # plain kinds never touch the scratch arguments


def _require() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the decode kernels are unavailable: {_reason}")
    return lib


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def gemv(w: Weights, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) -> fp32 [M, N] = x @ W^T, reading each weight once per call.

    Float kinds take at most MAX_ROWS rows; integer kinds any number (their tiles keep no per-row state)."""
    x = x.float().contiguous()
    M, K = x.shape
    if M > MAX_ROWS and not w.integer:
        raise ValueError(f"gemv takes at most {MAX_ROWS} activation rows of float weights, got {M}; use a GEMM")
    y = torch.empty(M, w.out_features)
    xp, xs = (torch.empty(M * K), torch.empty(M * K)) if w.integer else (_NO_SCRATCH, _NO_SCRATCH)
    _require().ernie45_gemv(ctypes.byref(w.view), _ptr(x), M, K, w.out_features, _ptr(y), _ptr(xp), _ptr(xs),
                      torch.get_num_threads())
    return y


def same_layout(a: Weights, b: Weights) -> bool:
    """Whether two stacked expert weights share kind, group, shape and strides: the expert kernels read
    gate and up through one set of strides and one prepared activation row."""
    return (a.kind == b.kind and a.group == b.group and a.data.shape == b.data.shape
            and a.expert_strides() == b.expert_strides())


def _require_gate_up(gate: Weights, up: Weights) -> None:
    if not same_layout(gate, up):
        raise ValueError("gate and up experts must share one format (kind, group, shape) for the expert "
                         "kernels; use the modules' own path for mixed formats")


def moe_token(gate: Weights, up: Weights, down: Weights, ids: torch.Tensor, coef: torch.Tensor,
              x: torch.Tensor, y: torch.Tensor, bf16: bool) -> torch.Tensor:
    """One token through experts `ids` [n] (int64) with weights `coef` [n]: y [D] fp32 += sum, in order.

    gate/up: stacked [E, F, D], down [E, D, F]. `bf16` rounds intermediates as the bf16 reference does.
    """
    _require_gate_up(gate, up)
    x = x.float().contiguous()
    ids, coef = ids.to(torch.long).contiguous(), coef.float().contiguous()
    D, F = x.shape[-1], gate.out_features
    n = int(ids.numel())
    h = torch.empty(max(n, 1) * F)  # every expert's hidden row (moe.c's experts_into)
    width = max(D, F) + n * F
    xp, xs = torch.empty(width), torch.empty(width)
    wgu, sgu = gate.expert_strides()
    wd, sd = down.expert_strides()
    _require().ernie45_moe_token(ctypes.byref(gate.view), ctypes.byref(up.view), ctypes.byref(down.view),
                           ctypes.c_long(wgu), ctypes.c_long(sgu), ctypes.c_long(wd), ctypes.c_long(sd),
                           _ptr(ids), _ptr(coef), int(ids.numel()), _ptr(x), D, F, _ptr(y), _ptr(h),
                           _ptr(xp), _ptr(xs), int(bf16), torch.get_num_threads())
    return y


DECODE_PHASES = ("norm_qkv", "rope_kv_write", "attention", "o_proj_norm", "router", "experts_gate_up",
                 "experts_down", "shared_gate_up", "shared_down", "dense_gate_up", "dense_down", "residual")


def moe_tokens(gate: Weights, up: Weights, down: Weights, ids: torch.Tensor, tok: torch.Tensor, coef: torch.Tensor,
               x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """(token, expert, weight) pairs [P] sorted by expert then token -> fp32 [T, D] = sum of weighted experts.

    Each expert runs once on all its rows, MAX_ROWS at a time (a prefill's experts have more); the same
    order and rounding as moe.Experts.grouped.
    """
    _require_gate_up(gate, up)
    x = x.float().contiguous()
    T, D = x.shape
    F = gate.out_features
    ids, tok, coef = ids.to(torch.long).contiguous(), tok.to(torch.long).contiguous(), coef.float().contiguous()
    if bool(((ids[1:] == ids[:-1]) & (tok[1:] == tok[:-1])).any()):  # sorted: a repeat is adjacent
        raise ValueError("moe_tokens: a (token, expert) pair appears twice; each token's experts must be distinct "
                         "(as top-k routing gives them)")
    rows = min(int(torch.bincount(ids).max()), MAX_ROWS) if ids.numel() else 0
    y = torch.zeros(T, D)
    width = max(D, F)
    X, Y = torch.empty(rows * D), torch.empty(rows * D)
    G, U = torch.empty(rows * F), torch.empty(rows * F)
    xp, xs = torch.empty(rows * width), torch.empty(rows * width)
    wgu, sgu = gate.expert_strides()
    wd, sd = down.expert_strides()
    _require().ernie45_moe_tokens(ctypes.byref(gate.view), ctypes.byref(up.view), ctypes.byref(down.view),
                                  ctypes.c_long(wgu), ctypes.c_long(sgu), ctypes.c_long(wd), ctypes.c_long(sd),
                                  _ptr(ids), _ptr(tok), _ptr(coef), int(ids.numel()), rows, _ptr(x), D, F, _ptr(y),
                                  _ptr(X), _ptr(G), _ptr(U), _ptr(Y), _ptr(xp), _ptr(xs), int(bf16),
                                  torch.get_num_threads())
    return y


# The calls into decode.c (the one-call step, paged attention, one-row norm) and head.c (the exact greedy
# head) live in their own modules; re-exported here.
from .decode_step import ModelT, decode, greedy_step, paged_attention, rms_norm  # noqa: E402,F401
from .head import (SCREEN_RMAX, SCREEN_TILE, head_candidates, head_exact, head_pick_rows,  # noqa: E402,F401
                   head_screen, head_screen_rows)
