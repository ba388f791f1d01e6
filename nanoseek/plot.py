"""`nanoseek plot RUN`: PNGs from a run's metrics.jsonl -- losses, learning rate, expert load over steps.

Writes RUN/plots/loss.png (total, next-token and MTP loss), lr.png, and expert_load.png (one
heatmap per MoE layer: each expert's share of the routed tokens, relative to a perfectly even
share, over the steps -- auxiliary-loss-free balancing should pull it toward 1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; is {run} a training run dir?")
    rows = []
    lines = path.read_text().splitlines()
    for lineno, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(lines):  # a run killed mid-write leaves half a line: skip it
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON") from None
    if not rows:
        raise ValueError(f"{path}: no steps logged yet")
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> None:
    """fig as a PNG at path, written beside it and renamed into place: a stop mid-write leaves no half image."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def _lines(path: Path, x: list, series: dict[str, list], xlabel: str, ylabel: str | None = None,
           height: float = 4.0, ylim: tuple[float, float] | None = None) -> Path:
    """One PNG of line plots sharing an x axis; a legend when there is more than one line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, height))
    for label, ys in series.items():
        ax.plot(x, ys, label=label, lw=1)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_run(run: str | Path) -> list[Path]:
    import numpy as np

    plt = _pyplot()
    rows = [r for r in read_metrics(run) if not r.get("skipped")]
    out = Path(run) / "plots"
    out.mkdir(exist_ok=True)
    steps = [r["step"] for r in rows]
    losses = {label: [r[key] for r in rows] for key, label in (("loss", "total"), ("lm_loss", "next token"),
                                                               ("mtp_loss", "MTP")) if any(r.get(key) for r in rows)}
    written = [_lines(out / "loss.png", steps, losses, "step", "loss"),
               _lines(out / "lr.png", steps, {"lr": [r["lr"] for r in rows]}, "step", "learning rate", height=3)]

    counts = [r["expert_counts"] for r in rows if r.get("expert_counts")]
    if counts:
        arr = np.array(counts, dtype=float)  # (steps, layers, experts)
        share = arr / arr.sum(-1, keepdims=True).clip(min=1) * arr.shape[-1]
        layers = arr.shape[1]
        config = Path(run) / "config.json"  # the last rows are the MTP modules' (model.moe_gates order)
        mtp = json.loads(config.read_text()).get("num_nextn_predict_layers", 0) if config.exists() else 0
        fig, axes = plt.subplots(layers, 1, figsize=(7, 2.2 * layers + 0.6), squeeze=False)
        for i, ax in enumerate(axes[:, 0]):
            im = ax.imshow(share[:, i].T, aspect="auto", cmap="viridis", interpolation="nearest",
                           extent=(steps[0], steps[-1], arr.shape[-1] - 0.5, -0.5), vmin=0, vmax=max(2, share.max()))
            name = f"MTP module {i - layers + mtp + 1}" if i >= layers - mtp else f"MoE layer {i}"
            ax.set_ylabel(f"{name}\nexpert")
            fig.colorbar(im, ax=ax, label="load / even share")
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        _save(fig, out / "expert_load.png")
        written.append(out / "expert_load.png")
    plt.close("all")
    return written


def plot_grpo(run: str | Path) -> list[Path]:
    """RUN/plots/reward.png (mean reward, accuracy and format rate per step) and response_length.png."""
    rows = read_metrics(run)
    out = Path(run) / "plots"
    out.mkdir(exist_ok=True)
    steps = [r["step"] for r in rows]
    rewards = {label: [r[key] for r in rows]
               for key, label in (("reward", "mean reward"), ("accuracy", "accuracy"), ("format", "format rate"))}
    return [_lines(out / "reward.png", steps, rewards, "GRPO step", ylim=(-0.02, 1.1)),
            _lines(out / "response_length.png", steps, {"length": [r["response_length"] for r in rows]}, "GRPO step",
                   "mean response length (tokens)", height=3)]


def plot_accuracy(accuracy: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Grouped bars: greedy test accuracy of each task ({stage: {task: pass@1}}) after each stage."""
    import textwrap

    plt = _pyplot()
    stages = list(accuracy)
    tasks = sorted({t for v in accuracy.values() for t in v})
    fig, ax = plt.subplots(figsize=(max(7.0, 1.15 * len(stages)), 3.8))  # room for each stage's label
    width = 0.8 / max(1, len(tasks))
    for i, task in enumerate(tasks):
        xs = [s + i * width for s in range(len(stages))]
        vals = [100 * accuracy[st].get(task, 0.0) for st in stages]
        bars = ax.bar(xs, vals, width, label=task)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([s + width * (len(tasks) - 1) / 2 for s in range(len(stages))],
                  [textwrap.fill(st, 13) for st in stages], fontsize=8)
    ax.set_ylabel("test pass@1 (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, path)
    plt.close("all")
    return Path(path)


def plot_curves(curves: dict[str, Path], path: str | Path) -> Path:
    """Held-out greedy pass@1 and response length over the GRPO steps, one line per run ({label: eval.jsonl})."""
    import json

    plt = _pyplot()
    fig, (acc, length) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, file in curves.items():
        rows = [json.loads(line) for line in Path(file).read_text().splitlines()] if Path(file).exists() else []
        steps = [r["step"] for r in rows]
        acc.plot(steps, [100 * r["pass1"] for r in rows], marker="o", ms=3, lw=1, label=label)
        length.plot(steps, [r["mean_tokens"] for r in rows], marker="o", ms=3, lw=1, label=label)
    acc.set_ylabel("held-out pass@1 (%)")
    acc.set_ylim(bottom=0)
    length.set_ylabel("held-out response length (tokens)")
    for ax in (acc, length):
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    if curves:
        acc.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_losses(runs: dict[str, Path], path: str | Path, smooth: int = 10, key: str = "loss",
                start: int = 0) -> Path:
    """Training loss (`key` of the metrics: "loss" the total, "lm_loss" the next-token loss) over the steps after
    `start`, one line per run ({label: run dir}), each a running mean over `smooth` steps so that runs differing
    by less than the step-to-step noise can be told apart; `start` skips the first fall, which would otherwise
    set the y axis."""
    series, steps = {}, []
    for label, run in runs.items():
        rows = [r for r in read_metrics(run) if key in r]
        loss = [r[key] for r in rows]
        series[label] = [sum(loss[max(0, i - smooth + 1):i + 1]) / len(loss[max(0, i - smooth + 1):i + 1])
                         for i in range(len(loss))]
        steps = steps if len(steps) >= len(rows) else [r["step"] for r in rows]
    n = min(len(s) for s in series.values())
    first = next((i for i, step in enumerate(steps[:n]) if step > start), n)
    name = "next-token loss" if key == "lm_loss" else "training loss"
    return _lines(Path(path), steps[first:n], {k: v[first:n] for k, v in series.items()}, "step",
                  f"{name} (mean of {smooth} steps)")
