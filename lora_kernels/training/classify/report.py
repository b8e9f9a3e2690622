"""The comparison's artefacts, from the per-run rows (one per method and seed):

<prefix>.md         setup, the mean ± std table, accuracy per seed, the paired differences
<prefix>.csv        one row per method: mean and std of every metric over the seeds
<prefix>_runs.csv   one row per (method, seed): the raw numbers the summary is computed from
<prefix>.png        the spread: every seed as a dot, mean ± std as a bar; parameters, time, memory, loss
<prefix>.json       resolved config, environment, summary, pairs, runs with their per-step losses
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .stats import METRICS, Pair, Spread, all_pairs, compare_pair, summarize

SUMMARY_COLUMNS = [  # (title, key, format): Spread columns are formatted as mean ± std
    ("method", "name", "{}"),
    ("trainable params", "trainable_params", "{:,}"),
    ("% of total", "trainable_pct", "{:.3f}"),
    ("test accuracy", "accuracy", ".4f"),
    ("macro-F1", "macro_f1", ".4f"),
    ("wall time (s)", "train_time_s", ".1f"),
    ("CPU time (s)", "cpu_time_s", ".1f"),
    ("peak memory (MiB)", "peak_mem_mib", ".0f"),
    ("tokens/s", "tokens_per_s", ",.0f"),
]
RUN_KEYS = ["name", "method", "r", "seed", "trainable_params", "total_params", "trainable_pct", "steps", *METRICS]


def _cell(value, fmt: str) -> str:
    return value.fmt(fmt) if isinstance(value, Spread) else fmt.format(value)


def summary_table(summary: dict[str, dict]) -> str:
    lines = [
        "| " + " | ".join(c[0] for c in SUMMARY_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(SUMMARY_COLUMNS) - 1)) + "|",
    ]
    for row in summary.values():
        lines.append("| " + " | ".join(_cell(row[key], fmt) for _, key, fmt in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines)


def per_seed_table(runs: list[dict], metric: str = "accuracy") -> str:
    seeds = sorted({r["seed"] for r in runs})
    names = list(dict.fromkeys(r["name"] for r in runs))
    val = {(r["name"], r["seed"]): r[metric] for r in runs}
    lines = [
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
    ]
    for n in names:
        cells = [f"{val[(n, s)]:.4f}" if (n, s) in val else "" for s in seeds]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairs_table(runs: list[dict]) -> str:
    lines = [
        "| higher | lower | Δ accuracy (paired) | seeds higher / lower | separated? | Δ macro-F1 (paired) | separated? |",
        "|---|---|---:|---:|:---:|---:|:---:|",
    ]
    for p in all_pairs(runs, "accuracy"):
        f1 = compare_pair(runs, p.a, p.b, "macro_f1")
        lines.append(
            f"| {p.a} | {p.b} | {p.diff.fmt('+.4f')} | {p.wins} / {p.losses} | {'yes' if p.separated else 'no'} "
            f"| {f1.diff.fmt('+.4f')} | {'yes' if f1.separated else 'no'} |"
        )
    return "\n".join(lines)


def markdown(runs: list[dict], header: list[str]) -> str:
    summary = summarize(runs)
    n = max(len(s["seeds"]) for s in summary.values())
    parts = [
        "\n".join(header),
        f"## Mean ± standard deviation over {n} seed(s)",
        summary_table(summary),
        "## Test accuracy per seed",
        per_seed_table(runs),
    ]
    if n > 1:
        parts += [
            "## Differences between methods, paired by seed",
            "Δ: mean ± std over the seeds of (higher − lower) with the same seed. *Separated*: the two methods' "
            "mean ± std intervals do not overlap (the difference is larger than the spread); a plain reading, "
            f"not a significance test: with {n} seeds a standard deviation is itself rough.",
            pairs_table(runs),
        ]
    return "\n\n".join(parts) + "\n"


def write_csvs(runs: list[dict], out_dir: Path, prefix: str) -> None:
    summary = summarize(runs)
    const = ["name", "method", "r", "trainable_params", "total_params", "trainable_pct", "steps"]
    spread_keys = [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "min", "max")]
    with open(out_dir / f"{prefix}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*const, "seeds", *spread_keys])
        w.writeheader()
        for row in summary.values():
            out = {k: row[k] for k in const}
            out["seeds"] = len(row["seeds"])
            for m in METRICS:
                s = row[m]
                out.update({f"{m}_mean": s.mean, f"{m}_std": s.std, f"{m}_min": s.lo, f"{m}_max": s.hi})
            w.writerow(out)
    with open(out_dir / f"{prefix}_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_KEYS, extrasaction="ignore")
        w.writeheader()
        for row in runs:
            w.writerow(row)


def _jsonable(x):
    if isinstance(x, Spread):
        return {"mean": x.mean, "std": None if math.isnan(x.std) else x.std, "n": x.n, "min": x.lo, "max": x.hi}
    if isinstance(x, Pair):
        return {**{k: _jsonable(v) for k, v in x.__dict__.items()}}
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def write_json(runs: list[dict], meta: dict, path: Path) -> None:
    body = {
        **meta,
        "summary": _jsonable(list(summarize(runs).values())),
        "pairs": _jsonable(all_pairs(runs, "accuracy") + all_pairs(runs, "macro_f1")),
        "runs": runs,
    }
    path.write_text(json.dumps(_jsonable(body), indent=1))


def load_runs(path: str | Path) -> list[dict]:
    """The per-run rows of a ``<prefix>.json`` (to redraw the chart or the tables without retraining)."""
    return json.loads(Path(path).read_text())["runs"]
