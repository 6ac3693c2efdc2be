"""The loss-curve PNG: training LM/MTP loss per step and held-out loss at each evaluation.

Drawn with matplotlib's object API on an Agg canvas (``Figure`` + ``savefig``): no pyplot, so no global
figure state and no display backend is ever touched, which keeps it safe on headless machines and
inside a long-running process. matplotlib is optional for training: without it the run goes on and
``plot_history`` raises an ImportError naming the ``pip install``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _series(entries: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in entries if e.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_history(history: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """history = {"train": [{"step", "lm_loss", "mtp_loss"?}], "eval": [{"step", "heldout_loss"}]}."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the loss curve needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, style in (("lm_loss", "train LM", "-"), ("mtp_loss", "train MTP (t+2)", "-")):
        steps, values = _series(history.get("train", []), key)
        if steps:
            ax.plot(steps, values, style, linewidth=1.0, label=label)
    steps, values = _series(history.get("eval", []), "heldout_loss")
    if steps:
        ax.plot(steps, values, "o-", markersize=4, label="held-out LM")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "ERNIE 4.5 training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def write_history(history: dict[str, list[dict[str, Any]]], out_dir: str | Path, title: str = "") -> None:
    """history.json and loss.png in ``out_dir``; a missing matplotlib costs only the picture (one warning)."""
    out = Path(out_dir)
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    try:
        plot_history(history, out / "loss.png", title=title)
    except ImportError as e:
        print(f"ernie45 train: no loss.png ({e})", file=sys.stderr)
