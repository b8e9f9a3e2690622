"""Spread over seeds: per-method mean ± standard deviation, and method-vs-method differences paired by seed.

Every seed fixes the head (and adapter) initialisation, the dropout masks and the data order, identically for
every method (see :func:`lora_kernels.training.classify.train.run`), so two methods run with the same seed differ
only by the method. Two summaries follow from that:

* per method: mean and sample standard deviation (``ddof=1``; undefined, reported as NaN, for one seed) of each
  metric over the seeds;
* per pair of methods (A, B): the per-seed difference A − B, its mean and standard deviation, how many seeds A
  wins, and whether A and B are *separated*: their ``mean ± std`` intervals do not overlap. "Separated" is the
  plain reading of "larger than the spread", not a significance test (with 3 seeds a std is itself uncertain to
  about ±50%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

METRICS = ("accuracy", "macro_f1", "train_time_s", "cpu_time_s", "peak_mem_mib", "tokens_per_s", "final_loss")


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float  # sample standard deviation; NaN when n == 1
    n: int
    lo: float
    hi: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("Spread.of needs at least one value")
        n = len(values)
        mean = math.fsum(values) / n
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
        return cls(mean, std, n, min(values), max(values))

    def fmt(self, spec: str = ".4f") -> str:
        """``mean ± std`` (just the mean for one seed); a ``+`` in ``spec`` signs the mean only."""
        m = format(self.mean, spec)
        return m if math.isnan(self.std) else f"{m} ± {format(self.std, spec.replace('+', ''))}"


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per method name (in first-seen order): the constant columns and a :class:`Spread` per metric."""
    by: dict[str, list[dict]] = {}
    for row in runs:
        by.setdefault(row["name"], []).append(row)
    out = {}
    for name, rows in by.items():
        first = rows[0]
        out[name] = {
            "name": name,
            "method": first["method"],
            "r": first["r"],
            "trainable_params": first["trainable_params"],
            "total_params": first["total_params"],
            "trainable_pct": first["trainable_pct"],
            "steps": first["steps"],
            "seeds": [row["seed"] for row in rows],
            **{m: Spread.of([float(row[m]) for row in rows]) for m in METRICS},
        }
    return out


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    metric: str
    diff: Spread  # of the per-seed differences a - b
    wins: int  # seeds where a > b
    losses: int  # seeds where a < b
    separated: bool  # the mean ± std intervals of a and b do not overlap


def _interval(s: Spread) -> tuple[float, float]:
    half = 0.0 if math.isnan(s.std) else s.std
    return s.mean - half, s.mean + half


def compare_pair(runs: list[dict], a: str, b: str, metric: str = "accuracy") -> Pair:
    """``a`` against ``b`` on ``metric``, paired over the seeds both ran."""
    va = {row["seed"]: float(row[metric]) for row in runs if row["name"] == a}
    vb = {row["seed"]: float(row[metric]) for row in runs if row["name"] == b}
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        raise ValueError(f"methods {a!r} and {b!r} share no seed")
    diffs = [va[s] - vb[s] for s in seeds]
    lo_a, hi_a = _interval(Spread.of([va[s] for s in seeds]))
    lo_b, hi_b = _interval(Spread.of([vb[s] for s in seeds]))
    separated = len(seeds) > 1 and (lo_a > hi_b or lo_b > hi_a)
    return Pair(a, b, metric, Spread.of(diffs), sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), separated)


def all_pairs(runs: list[dict], metric: str = "accuracy") -> list[Pair]:
    """Every pair of methods once, in run order, each oriented so that ``a`` has the higher (or equal) mean."""
    names = list(dict.fromkeys(row["name"] for row in runs))
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            p = compare_pair(runs, a, b, metric)
            out.append(p if p.diff.mean >= 0 else compare_pair(runs, b, a, metric))
    return out
