"""speed.md (tables with ratios) and speed.png (decode roofline) from bench/speed.py's results dict."""

from __future__ import annotations

from pathlib import Path


def _f(x, fmt: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _run_row(label: str, r: dict, agree: dict) -> str:
    if "skipped" in r or "error" in r:
        why = r.get("skipped") or r["error"].splitlines()[0]
        return f"| {label} | {'skipped' if 'skipped' in r else 'FAILED'}: {why} |" + " |" * 11
    tput = r.get("throughput_tok_s") or {}
    a = agree.get(label)
    greedy = "reference" if label == "transformers fp32" else (
        "-" if a is None else f"{a['matching_prefix']}/{a['of']}" + (" identical" if a["identical"] else ""))
    active = r.get("active_weight_bytes")
    check = r.get("greedy_matches_reference")
    fast_ref = "-" if check is None else ("yes" if check else f"**no** (prefix {r.get('greedy_prefix_agreement')})")
    return (f"| {label} | {_f(r['decode_tok_s'])} | {_f(r.get('prefill_tok_s'))} | {_f(tput.get('8'))} | "
            f"{_f(tput.get('32'))} | {_f(r['peak_rss_bytes'] / 1e9, '.2f')} | "
            f"{_f(active and active / 1e6, '.0f')} | {_f(r.get('roofline_tok_s'))} | "
            f"{_f(r.get('roofline_fraction') and 100 * r['roofline_fraction'], '.0f')}% | {greedy} | {fast_ref} | "
            f"{_f(r.get('loadavg_before'), '.2f')} |")


def definitions(w: dict) -> str:
    return (f"Definitions: decode = batch-1 greedy, {w['prompt_tokens']}-token prompt (ids 100..), "
            f"{w['new_tokens']} new tokens, tokens after the first over their time (the prompt excluded); prefill = "
            f"one {w['prefill_tokens']}-token forward; throughput = generated tokens/s of {w['concurrency']} "
            f"concurrent sequences of {w['concurrent_new_tokens']} new tokens each, wall time of the whole batch. "
            "Peak RSS is each configuration's own process. Active bytes: ernie45 reports its planner's; "
            "transformers' are params_active x dtype size; llama.cpp's are counted from its GGUF tensors. "
            "Greedy agreement is the length of the common prefix with transformers fp32 ids (bf16 and quantized "
            "weights may leave it after a near-tie); `fast = ref` is ernie45's own check that its fast path "
            "generates the same ids as its reference modules. `load avg before` is the machine's 1-minute load "
            "average when that configuration started (2 cores: above about 1 another job shared them); with "
            "--rounds N each configuration ran N times and its fastest decode is shown (all are in speed.json).")


RUN_HEADER = ("| configuration | decode tok/s | prefill tok/s | throughput tok/s @8 | @32 | peak RSS GB "
              "| active MB/token | roofline tok/s | % of roofline | greedy = transformers fp32 (prefix) | fast = ref "
              "| load avg before |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
RATIO_HEADER = ("| ernie45 | peer | decode | target | met | prefill | throughput @8 | @32 |\n"
                "|---|---|---|---|---|---|---|---|")


def _context(res: dict) -> list[str]:
    m, bw, p = res["machine"], res["bandwidth"], res["params"]
    ram = _f(m["ram_bytes"] and m["ram_bytes"] / 2**30, ".0f")
    cpu = m["cpu"] + (f" ({m['cpu_family']}; {', '.join(m['cpu_features'])})" if m.get("cpu_features") else "")
    machine = (f"Machine: {cpu}, {m['cores']} cores, {ram} GiB RAM; {m['threads']} threads for every system; "
               f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}. Load average "
               f"{m['loadavg_start']} at start, {m['loadavg_end']} at end (the machine is shared: other work "
               "competes for the same cores and memory bus).")
    model = (f"Model: `{res['model']}` ({p['params_total'] / 1e6:.1f} M params, {p['params_active'] / 1e6:.1f} M "
             "active per token; random weights).")
    probes = ", ".join(_f(g) for g in bw.get("probes_gb_s", []))
    bandwidth = (f"Read bandwidth: {_f(bw.get('read_gb_s'))} GB/s ({bw.get('method', bw.get('error'))}, "
                 f"{bw.get('tensor_bytes', 0) / 1e9:.2f} GB tensor; the better of the probes before and after the "
                 f"systems ran: {probes} GB/s). Roofline = bandwidth / active bytes per token; a system above 100% "
                 "means the probe under-measured what the memory can deliver.")
    return [f"Command: `{res['command']}`", "", machine, "", model, "", bandwidth, ""]


def _ratio_row(r: dict) -> str:
    met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
    roof = r["peer"] == "roofline"
    target = "-" if r["target"] is None else (f">= {r['target']:.0%}" if roof else f">= {r['target']}x")
    decode = f"{r['decode']:.0%}" if roof else f"{r['decode']:.2f}x"
    return (f"| {r['ernie45']} | {r['peer']} | {decode} | {target} | {met} | {_f(r.get('prefill'), '.2f')} "
            f"| {_f(r.get('throughput_8'), '.2f')} | {_f(r.get('throughput_32'), '.2f')} |")


def write_markdown(res: dict, path: Path) -> None:
    lines = ["# Decode speed: ernie45 vs transformers vs llama.cpp on the same weights", "", *_context(res), RUN_HEADER]
    lines += [_run_row(label, r, res["greedy_agreement"]) for label, r in res["runs"].items()]
    lines += ["", "## Ratios (ernie45 / peer; targets from issue 7)", "", RATIO_HEADER]
    lines += [_ratio_row(r) for r in res["ratios"]]
    lines += ["", definitions(res["workload"]), "", "![roofline](speed.png)"]
    path.write_text("\n".join(lines) + "\n")


MARKERS = {"ernie45": "o", "transformers": "s", "llama.cpp": "^"}


def write_plot(res: dict, path: Path) -> None:
    """log-log: active bytes per token (x) vs decode tok/s (y), one point per configuration; the
    bandwidth line y = BW / x is the roofline, and the 60% line the int8 target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(label, r) for label, r in res["runs"].items() if r.get("decode_tok_s") and r.get("active_weight_bytes")]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    bw = res["bandwidth"].get("read_gb_s")
    xs = [r["active_weight_bytes"] for _, r in pts] or [1e8, 1e9]
    lo, hi = min(xs) / 2, max(xs) * 2
    if bw:
        grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
        ax.plot(grid, [bw * 1e9 / x for x in grid], "k-", lw=1, label=f"roofline: {bw:.1f} GB/s read")
        ax.plot(grid, [0.6 * bw * 1e9 / x for x in grid], "k:", lw=1, label="60% of roofline")
    for label, r in pts:
        ax.scatter(r["active_weight_bytes"], r["decode_tok_s"], marker=MARKERS.get(r["system"], "x"), s=50,
                   label=label, zorder=3)
        ax.annotate(r["precision"], (r["active_weight_bytes"], r["decode_tok_s"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("active weight bytes read per decode token")
    ax.set_ylabel("batch-1 decode tokens/s")
    ax.set_title(f"Decode roofline, {Path(res['model']).name}, threads: {res['machine']['threads']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
