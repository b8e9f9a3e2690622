"""The comparison chart: the spread over seeds made visible.

Panels: test accuracy and macro-F1 (every seed a dot, the bar its mean, the whisker ± one std), trainable
parameters (log), training wall time and peak memory (mean ± std, dots per seed), and the training loss
(mean over seeds of a moving average, the band from the lowest to the highest seed).
"""

from __future__ import annotations

import math
from pathlib import Path

from .stats import summarize


def _spread_panel(ax, names, runs, summary, key, title, color="tab:blue") -> None:
    xs = list(range(len(names)))
    means = [summary[n][key].mean for n in names]
    stds = [0.0 if math.isnan(summary[n][key].std) else summary[n][key].std for n in names]
    ax.bar(xs, means, 0.6, yerr=stds, capsize=4, color=color, alpha=0.35, label="mean ± std")
    for i, n in enumerate(names):
        vals = [r[key] for r in runs if r["name"] == n]
        k = len(vals)
        offsets = [0.0] if k == 1 else [-0.15 + 0.3 * j / (k - 1) for j in range(k)]
        ax.scatter([i + o for o in offsets], vals, s=14, color="black", zorder=3, label="one seed" if i == 0 else None)
    ax.set_title(title)


def _smooth(losses: list[float]) -> list[float]:
    k = max(1, len(losses) // 20)  # moving average over ~5% of the run
    return [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]


def write_chart(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    names = list(summary)
    n_seeds = max(len(s["seeds"]) for s in summary.values())
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    _spread_panel(axes[0, 0], names, runs, summary, "accuracy", "test accuracy")
    _spread_panel(axes[0, 1], names, runs, summary, "macro_f1", "test macro-F1", color="tab:orange")
    lo = min(min(r["accuracy"], r["macro_f1"]) for r in runs)
    for ax in (axes[0, 0], axes[0, 1]):
        ax.set_ylim(max(0.0, lo - 0.03), min(1.0, max(max(r["accuracy"], r["macro_f1"]) for r in runs) + 0.01))
    axes[0, 0].legend(loc="lower right", fontsize=8)
    ax = axes[0, 2]
    ax.bar(range(len(names)), [summary[n]["trainable_params"] for n in names], color="tab:gray")
    ax.set_yscale("log")
    ax.set_title("trainable parameters (log)")
    _spread_panel(axes[1, 0], names, runs, summary, "train_time_s", "training wall time (s)", color="tab:gray")
    _spread_panel(axes[1, 1], names, runs, summary, "peak_mem_mib", "peak memory above model (MiB)", "tab:olive")
    for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0], axes[1, 1]):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax = axes[1, 2]
    for n in names:
        curves = [_smooth(r["losses"]) for r in runs if r["name"] == n and r.get("losses")]
        if not curves:
            continue
        steps = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(steps)]
        (line,) = ax.plot(range(1, steps + 1), mean, label=n)
        if len(curves) > 1:
            lo_c = [min(c[i] for c in curves) for i in range(steps)]
            hi_c = [max(c[i] for c in curves) for i in range(steps)]
            ax.fill_between(range(1, steps + 1), lo_c, hi_c, color=line.get_color(), alpha=0.15)
    ax.set_title("training loss (moving avg.; band: min-max over seeds)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.suptitle(f"{title} — {n_seeds} seed(s) per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
