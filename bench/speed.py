"""ernie45 against its peers on the same weights: decode, prefill, batched throughput, memory, roofline.

One run, one checkpoint, every system in its own process (so each configuration's peak RSS is its own):
- ernie45: `python -m ernie45 bench --model DIR [--dtype D | --quant Q] --threads N --json` (its fast
  path, and its own check against its reference path), for fp32, bf16, int8 and int4 (quantized RTN in
  memory from the same weights, bf16 activations by the CLI's default);
- transformers `Ernie4_5_MoeForCausalLM`, fp32 and bf16 (bench/speed_transformers.py, which measures the
  same quantities the same way: see its docstring);
- llama.cpp bf16 / q8_0 / Q4_0 on a GGUF converted from the same checkpoint, when llama-cpp-python and
  llama.cpp's converter are present (bench/speed_llamacpp.py); otherwise skipped, and the results say why;
- the machine's read bandwidth (bench/bandwidth.py), with the same thread count, before and after the
  systems run (the better probe counts);
Batch-1 decode reads every active weight once per token, so bandwidth / active bytes per token is an
upper bound on decode tok/s (the roofline); each system is reported as a fraction of it. Greedy ids of
every system are compared with transformers fp32 (the reference), so speed is never bought with wrong
answers: fp32 must agree on all tokens; bf16 and quantized weights may drift after a near-tie.

The default model is the "bench-medium" random checkpoint (shared/spec/field-notes.md: 516.9 M params,
197.6 M active, real 103,424 vocab), created with `ernie45 random-checkpoint` when the directory is
missing. The workload (WORKLOAD below) is passed to every system with `ernie45 bench`'s flag names: 16-token
prompt and 64 new tokens for decode, 512-token prefill, 8 and 32 concurrent sequences of 32 new tokens.
`--quick` is a smoke run (the 6-layer mini-300B-A47B, ernie45 fp32 + int8 and transformers fp32, a shorter
workload, no llama.cpp, a small bandwidth probe) that writes to a scratch directory, for tests.

    python bench/speed.py [--model DIR] [--threads 2] [--rounds 1] [--llama-converter PATH] [--quick] [--out DIR]
writes speed.json, speed.md and speed.png to bench/results (--quick: /tmp/ernie45-bench/quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SCRATCH = Path("/tmp/ernie45-bench")
ERNIE45 = {"fp32": ["--dtype", "fp32"], "bf16": ["--dtype", "bf16"], "int8": ["--quant", "int8"],
           "int4": ["--quant", "int4"]}
TRANSFORMERS = ("fp32", "bf16")
LLAMA = ("bf16", "q8_0", "Q4_0")
# (ernie45 config, peer, target ratio of decode tok/s from issue 7; None = shown, no target)
PAIRS = [("ernie45 fp32", "transformers fp32", 2.5), ("ernie45 bf16", "transformers bf16", 2.5),
         ("ernie45 bf16", "llama.cpp bf16", 1.0), ("ernie45 int8", "llama.cpp q8_0", 1.0),
         ("ernie45 int4", "llama.cpp Q4_0", 1.0), ("ernie45 int8", "transformers bf16", None),
         ("ernie45 int4", "transformers bf16", None)]
ROOFLINE_TARGETS = {"ernie45 int8": 0.6}
# The workload, passed explicitly to every system (flag names are `ernie45 bench`'s).
WORKLOAD = {"prompt_tokens": 16, "new_tokens": 64, "prefill_tokens": 512, "concurrency": "8,32",
            "concurrent_new_tokens": 32}
QUICK_WORKLOAD = {"prompt_tokens": 16, "new_tokens": 16, "prefill_tokens": 64, "concurrency": "8,32",
                  "concurrent_new_tokens": 8}
TIMEOUT_S = 3600


def child_env(threads: int) -> dict:
    """Every child: N threads for every runtime, and this checkout's ernie45 first on the path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}


def run_json(label: str, cmd: list[str], threads: int) -> dict:
    """Run one measurement process; its stdout's JSON object, or {"error": ...} naming what failed."""
    print(f"[{label}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0, load = time.perf_counter(), round(os.getloadavg()[0], 2)
    try:
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=child_env(threads), capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT_S} s", "command": shlex.join(cmd)}
    result = parse_json(proc.stdout) if proc.returncode == 0 else None
    if result is not None:
        return {**result, "command": shlex.join(cmd), "wall_s": time.perf_counter() - t0, "loadavg_before": load}
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
    print(f"[{label}] FAILED (exit {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
    return {"error": f"exit code {proc.returncode}: {tail}", "command": shlex.join(cmd)}


def parse_json(stdout: str) -> dict | None:
    """The whole stdout as one JSON object (indented or not), else its last line as one."""
    out = stdout.strip()
    for text in (out, out.splitlines()[-1] if out else ""):
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def ensure_checkpoint(model: Path, like: str) -> None:
    if (model / "config.json").is_file():
        return
    print(f"creating the random {like} checkpoint in {model}", file=sys.stderr, flush=True)
    # std 0.08: logits spread enough that greedy output varies, so the greedy checks compare real choices
    subprocess.run([sys.executable, "-m", "ernie45", "random-checkpoint", str(model), "--like", like, "--std", "0.08"],
                   cwd=REPO, env=child_env(2), check=True)
    os.sync()  # its dirty pages written back now, not while the first configuration is being timed


def params(model: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "ernie45", "info", str(model), "--json"], cwd=REPO,
                         env=child_env(1), check=True, capture_output=True, text=True).stdout
    info = json.loads(out)
    return {k: info[k] for k in ("params_total", "params_active")} | {"config": info["config"]}


# ---- measurements --------------------------------------------------------------------------------
def workload_flags(workload: dict, concurrency: bool = True) -> list[str]:
    keys = [k for k in workload if concurrency or not k.startswith("concurren")]
    return [x for k in keys for x in ("--" + k.replace("_", "-"), str(workload[k]))]


def jobs(args: argparse.Namespace) -> tuple[list[tuple[str, dict, list[str]]], dict]:
    """-> ([(label, {system, precision, ...}, command)], {label: skipped entry}) for this run."""
    py, n = sys.executable, str(args.threads)
    out = []
    for name in args.ernie45:
        out.append((f"ernie45 {name}", {"system": "ernie45", "precision": name},
                    [*shlex.split(args.ernie45_command), "--model", str(args.model), *ERNIE45[name], "--threads", n,
                     *workload_flags(args.workload), "--json"]))
    for dtype in args.transformers:
        out.append((f"transformers {dtype}", {"system": "transformers", "precision": dtype},
                    [py, str(BENCH / "speed_transformers.py"), "--model", str(args.model), "--dtype", dtype,
                     "--threads", n, *workload_flags(args.workload)]))
    llama, skipped = llama_jobs(args)
    return out + llama, skipped


def measure_all(args: argparse.Namespace) -> tuple[dict, dict]:
    """-> (bandwidth result, {label: result}). Every configuration runs `--rounds` times, round-robin, and
    keeps its fastest decode: on the shared machine one run can be several times slower than the next
    (another job's threads on the same two cores stall every OpenMP barrier)."""
    probe = [sys.executable, str(BENCH / "bandwidth.py"), "--threads", str(args.threads), "--gbytes", str(args.bw_gbytes)]
    first = run_json("bandwidth", probe, args.threads)
    todo, runs = jobs(args)
    tries: dict[str, list[dict]] = {label: [] for label, _, _ in todo}
    for r in range(args.rounds):
        for label, meta, cmd in todo:
            tries[label].append({**meta, **run_json(f"{label} (round {r + 1})", cmd, args.threads)})
    for label, results in tries.items():
        ok = [t for t in results if "decode_tok_s" in t]
        best = max(ok, key=lambda t: t["decode_tok_s"]) if ok else results[-1]
        runs[label] = {**best, "rounds_decode_tok_s": [t.get("decode_tok_s") for t in results]}
    return best_bandwidth(first, run_json("bandwidth", probe, args.threads)), runs


def best_bandwidth(first: dict, last: dict) -> dict:
    """The better of the probes before and after the systems ran: other work on the shared machine can
    halve one probe, and an under-measured bandwidth would put systems above their roofline."""
    probes = [p for p in (first, last) if "read_gb_s" in p]
    if not probes:
        return first
    best = max(probes, key=lambda p: p["read_gb_s"])
    return {**best, "probes_gb_s": [p.get("read_gb_s") for p in (first, last)]}


def llama_jobs(args: argparse.Namespace) -> tuple[list[tuple[str, dict, list[str]]], dict]:
    """Convert once (bench/speed_llamacpp.py prepare), then one job per GGUF type; or why they are skipped."""
    if args.quick:
        print("[llama.cpp] skipped in --quick", file=sys.stderr)
        return [], {}
    script, n = str(BENCH / "speed_llamacpp.py"), str(args.threads)
    conv = ["--converter", args.llama_converter] if args.llama_converter else []
    work = SCRATCH / f"gguf-{args.model.name}"
    prep = run_json("llama.cpp convert", [sys.executable, script, "prepare", "--model", str(args.model), "--work",
                                          str(work), "--threads", n, *conv], args.threads)
    if "gguf" not in prep:
        reason = prep.get("skipped") or prep.get("error")
        print(f"[llama.cpp] skipped: {reason}", file=sys.stderr, flush=True)
        return [], {f"llama.cpp {t}": {"system": "llama.cpp", "precision": t, "skipped": reason} for t in LLAMA}
    return [(f"llama.cpp {t}", {"system": "llama.cpp", "precision": t, "conversion": prep},
             [sys.executable, script, "measure", "--gguf", prep["gguf"][t], "--type", t, "--model", str(args.model),
              "--threads", n, *conv, *workload_flags(args.workload, concurrency=False)]) for t in LLAMA], {}


# ---- analysis ------------------------------------------------------------------------------------
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}


def add_roofline(runs: dict, bandwidth_gb_s: float | None, params_active: int) -> None:
    """active bytes per token (reported, else params_active x dtype size) -> roofline tok/s and fraction."""
    for r in runs.values():
        if "decode_tok_s" not in r:
            continue
        if r.get("active_weight_bytes") is None and r["precision"] in BYTES_PER_PARAM:
            r["active_weight_bytes"] = params_active * BYTES_PER_PARAM[r["precision"]]
            r["active_weight_bytes_source"] = "params_active x dtype size (estimate)"
        if r.get("active_weight_bytes") and bandwidth_gb_s:
            r["roofline_tok_s"] = bandwidth_gb_s * 1e9 / r["active_weight_bytes"]
            r["roofline_fraction"] = r["decode_tok_s"] / r["roofline_tok_s"]


def agreement(runs: dict, reference: str = "transformers fp32") -> dict:
    """label -> {matching prefix, equal positions, of N} of greedy ids against the reference's."""
    ref = runs.get(reference, {}).get("greedy_tokens")
    if not ref:
        return {}
    out = {}
    for label, r in runs.items():
        toks = r.get("greedy_tokens")
        if label == reference or not toks:
            continue
        prefix = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), min(len(toks), len(ref)))
        out[label] = {"matching_prefix": prefix, "equal_positions": sum(a == b for a, b in zip(toks, ref)),
                      "of": len(ref), "identical": toks == ref}
    return out


def ratios(runs: dict) -> list[dict]:
    """ernie45 / peer for every pair present: decode (with the issue's target), prefill, throughput."""
    out = []
    for ours, peer, target in PAIRS:
        a, b = runs.get(ours, {}), runs.get(peer, {})
        if "decode_tok_s" not in a or "decode_tok_s" not in b:
            continue
        row = {"ernie45": ours, "peer": peer, "decode": a["decode_tok_s"] / b["decode_tok_s"], "target": target,
               "prefill": a["prefill_tok_s"] / b["prefill_tok_s"] if a.get("prefill_tok_s") and b.get("prefill_tok_s") else None}
        for batch in ("8", "32"):
            x, y = (a.get("throughput_tok_s") or {}).get(batch), (b.get("throughput_tok_s") or {}).get(batch)
            row[f"throughput_{batch}"] = x / y if x and y else None
        row["met"] = None if target is None else row["decode"] >= target
        out.append(row)
    for ours, target in ROOFLINE_TARGETS.items():
        frac = runs.get(ours, {}).get("roofline_fraction")
        if frac is not None:
            out.append({"ernie45": ours, "peer": "roofline", "decode": frac, "target": target, "met": frac >= target})
    return out


# Vector extensions that decide which kernels run (ours are AVX2/FMA; llama.cpp builds for the host CPU).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_info() -> tuple[str, str | None, list[str]]:
    """(model name, 'family F model M', the CPU_FEATURES present) from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    family = f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else None
    return fields.get("model name", platform.processor()), family, [f for f in CPU_FEATURES if f in flags]


def machine(args: argparse.Namespace) -> dict:
    cpu, family, features = cpu_info()
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    return {"cpu": cpu, "cpu_family": family, "cpu_features": features, "cores": os.cpu_count(), "ram_bytes": mem,
            "threads": args.threads,
            "torch": metadata.version("torch"), "transformers": metadata.version("transformers"),
            "python": platform.python_version(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="HF-layout checkpoint (default: a random bench-medium one (init std "
                   f"0.08), created in {SCRATCH}/bench-medium-std0.08 if missing; --quick: mini-300B-A47B)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, fewer configurations")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, round-robin, and keep its fastest decode")
    p.add_argument("--out", type=Path, help=f"results directory (default bench/results; --quick: {SCRATCH}/quick)")
    p.add_argument("--llama-converter", help="path to llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--ernie45-command", default=f"{shlex.quote(sys.executable)} -m ernie45 bench",
                   help="how to run ernie45's bench subcommand (default: this python -m ernie45 bench)")
    args = p.parse_args(argv)
    like = "mini-300B-A47B" if args.quick else "bench-medium"
    args.like = like
    args.model = args.model or SCRATCH / (like if args.quick else f"{like}-std0.08")
    args.out = args.out or (SCRATCH / "quick" if args.quick else BENCH / "results")
    args.ernie45 = ("fp32", "int8") if args.quick else tuple(ERNIE45)
    args.transformers = ("fp32",) if args.quick else TRANSFORMERS
    args.bw_gbytes = 0.25 if args.quick else 1.5
    args.workload = QUICK_WORKLOAD if args.quick else WORKLOAD
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(BENCH))
    from speed_report import write_markdown, write_plot

    ensure_checkpoint(args.model, args.like)
    res = {"command": shlex.join(["python", "bench/speed.py", *(sys.argv[1:] if argv is None else argv)]),
           "model": str(args.model), "quick": args.quick, "rounds": args.rounds, "workload": args.workload,
           "machine": machine(args),
           "params": params(args.model)}
    res["bandwidth"], res["runs"] = measure_all(args)
    res["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    add_roofline(res["runs"], res["bandwidth"].get("read_gb_s"), res["params"]["params_active"])
    res["greedy_agreement"] = agreement(res["runs"])
    res["ratios"] = ratios(res["runs"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(res, args.out / "speed.md")
    write_plot(res, args.out / "speed.png")
    print((args.out / "speed.md").read_text())
    failed = [label for label, r in res["runs"].items() if "error" in r] + (["bandwidth"] if "error" in res["bandwidth"] else [])
    if failed:
        print(f"failed configurations: {', '.join(failed)} (their errors are in speed.json)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
