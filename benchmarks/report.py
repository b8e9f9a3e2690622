"""Benchmark CSV -> markdown tables (ratios vs base and vs PEFT) and PNG plots (time vs M per provider).

    python -m benchmarks.report benchmarks/results/cpu.csv --md benchmarks/results/cpu_table.md \\
        --plot benchmarks/results/cpu_fwdbwd.png            # latest run of the file (--run ID, --all-runs)

Rows are the CSV's, as strings. Tables pivot one mode at a time: a row per case (M, K->N, r, dtype, dropout), a
column per provider, each cell ``median ms (x base / x PEFT)``; memory in MiB; a TFLOP/s table for fwd+bwd; and the
correctness cross-check per provider. A failed check is printed as **MISMATCH** in the cell.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import OrderedDict
from pathlib import Path

PROVIDER_ORDER = [
    "base",
    "peft",
    "addmm",
    "layer",
    "torch",
    "triton",
    "triton-fused",
    "triton-split",
    "cuda",
    "cuda-simple",
    "cuda-pipelined",
]
MODE_ORDER = ["fwd", "bwd", "fwd+bwd", "memory"]


def read_csv(path: Path, all_runs: bool = False, run: str | None = None) -> list[dict]:
    """The rows of the latest run in the file (or of ``run``, a run_id prefix; or every run)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if run:
        picked = [r for r in rows if r["run_id"].startswith(run)]
        if not picked:
            raise SystemExit(f"{path}: no run_id starts with {run!r}")
        return picked
    if not all_runs and rows:
        latest = rows[-1]["run_id"]
        rows = [r for r in rows if r["run_id"] == latest]
    return rows


def _f(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _providers(rows) -> list[str]:
    names = {r["provider"] for r in rows}
    return [p for p in PROVIDER_ORDER if p in names] + sorted(names - set(PROVIDER_ORDER))


def _case_key(r) -> tuple:
    return (int(r["K"]), int(r["N"]), int(r["r"]), r["dtype"], r["adapter_dtype"], float(r["dropout"]), int(r["M"]))


def _ratios(r) -> str:
    b, p = _f(r.get("ratio_to_base")), _f(r.get("ratio_to_peft"))
    if r.get("paired_ratio_to_base") or r.get("paired_ratio_to_peft"):  # CPU: paired per-round ratios
        b, p = _f(r.get("paired_ratio_to_base")), _f(r.get("paired_ratio_to_peft"))
    parts = [f"{b:.2f}" if b is not None else "–", f"{p:.2f}" if p is not None else "–"]
    return f"({parts[0]} / {parts[1]})"


def human_bytes(v: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= div:
            return f"{v / div:.1f} {unit}"
    return f"{v:.0f} B"


def _cell(r, mode: str) -> str:
    if mode == "memory":
        v = _f(r.get("peak_bytes")) if r.get("peak_bytes") else _f(r.get("saved_bytes"))
        txt = "–" if v is None else f"{human_bytes(v)} {_ratios(r)}"
    else:
        v = _f(r.get("median_ms"))
        txt = "–" if v is None else f"{v:.3f} {_ratios(r)}"
    if r.get("check", "").startswith("MISMATCH"):
        txt += " **MISMATCH**"
    return txt


def _pivot(rows, mode: str, cell) -> list[str]:
    provs = _providers(rows)
    cases: OrderedDict[tuple, dict] = OrderedDict()
    for r in sorted((r for r in rows if r["mode"] == mode), key=_case_key):
        cases.setdefault(_case_key(r), {})[r["provider"]] = r
    if not cases:
        return []
    out = ["| M | K->N | r | dtype (adapters) | dropout | " + " | ".join(provs) + " |"]
    out.append("|" + "---|" * (5 + len(provs)))
    for (k, n, rank, dt, adt, p, m), by in cases.items():
        cells = [cell(by[pv], mode) if pv in by else "skipped" for pv in provs]
        out.append(f"| {m} | {k}->{n} | {rank} | {dt} ({adt}) | {p:g} | " + " | ".join(cells) + " |")
    return out


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    r0 = rows[0]
    head = [
        f"LoRA linear benchmark — {r0['device']}, torch {r0['torch_version']}, triton {r0['triton_version']}, "
        f"peft {r0['peft_version']}, commit {r0['git_commit']}, run {r0['run_id']} (preset {r0['preset']}, "
        f"{r0['threads']} threads, load avg at start {r0['loadavg'] or '?'})",
        "",
        "Cells: median ms, or bytes for memory (× base / × PEFT); lower is better. Base = F.linear alone (the floor). "
        "GPU: do_bench medians (L2 flushed before each call), ratios of medians. CPU: providers interleaved round by "
        "round; time = median over rounds, ratio = median over rounds of the per-round ratio (paired, so a slow "
        "stretch of the shared machine cancels). p20/p80 and both ratio kinds are in the CSV.",
    ]
    out = head
    for mode in MODE_ORDER:
        if mode == "memory":
            gpu = any(r.get("peak_bytes") for r in rows if r["mode"] == "memory")
            title = (
                "memory: peak allocated over fwd+bwd above the inputs (GPU)"
                if gpu
                else "memory: activation bytes saved for backward (unique storages, parameters excluded)"
            )
        else:
            title = f"{mode}: ms"
        table = _pivot(rows, mode, _cell)
        if table:
            out += ["", f"### {title}", "", *table]
    tf = _pivot(rows, "fwd+bwd", lambda r, m: f"{_f(r['tflops']):.3g}" if _f(r.get("tflops")) else "–")
    if tf:
        out += ["", "### fwd+bwd: effective TFLOP/s (useful FLOPs: base GEMMs + LoRA GEMMs)", "", *tf]
    if any(_f(r.get("host_ms")) for r in rows):
        host = _pivot(
            rows,
            "fwd+bwd",
            lambda r, m: (
                "–"
                if _f(r.get("host_ms")) is None
                else f"{_f(r['host_ms']):.3f}"
                + (" (launch-bound)" if _f(r["host_ms"]) >= 0.9 * _f(r["median_ms"]) else "")
            ),
        )
        out += ["", "### fwd+bwd: host time to issue one call, ms (launch-bound when it reaches the device time)", ""]
        out += host
    checks: OrderedDict[tuple, dict] = OrderedDict()
    for r in sorted(rows, key=_case_key):
        checks.setdefault(_case_key(r), {})[r["provider"]] = r
    out += ["", "### correctness: forward output vs torch backend in higher precision (max abs err / derived tol)", ""]
    provs = _providers(rows)
    out.append("| M | K->N | r | dtype | dropout | " + " | ".join(provs) + " |")
    out.append("|" + "---|" * (5 + len(provs)))
    for (k, n, rank, dt, _adt, p, m), by in checks.items():
        cells = []
        for pv in provs:
            r = by.get(pv)
            if r is None:
                cells.append("skipped")
            elif not r.get("max_err"):
                cells.append(r.get("check") or "n/a")
            else:
                cells.append(f"{r['check']} {_f(r['max_err']):.2e}/{_f(r['tol']):.2e}")
        out.append(f"| {m} | {k}->{n} | {rank} | {dt} | {p:g} | " + " | ".join(cells) + " |")
    bad = [r for r in rows if r.get("check", "").startswith("MISMATCH")]
    if bad:
        out += ["", f"**{len({(r['provider'], _case_key(r)) for r in bad})} provider/case MISMATCH(ES): see above.**"]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path, mode: str = "fwd+bwd") -> None:
    """Time vs M per provider (log-log, p20-p80 bars), one panel per (K->N, r, dtype, dropout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["mode"] == mode and _f(r.get("median_ms")) is not None]
    groups: OrderedDict[tuple, list] = OrderedDict()
    for r in sorted(sel, key=_case_key):
        groups.setdefault(_case_key(r)[:-1], []).append(r)
    n = max(1, len(groups))
    cols = min(n, 2)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.2 * rows_n), squeeze=False)
    for ax, ((k, nn, rank, dt, adt, p), rs) in zip(axes.flat, groups.items()):
        for prov in _providers(rs):
            pts = sorted(
                (int(r["M"]), _f(r["median_ms"]), _f(r["p20_ms"]), _f(r["p80_ms"])) for r in rs if r["provider"] == prov
            )
            ms = [q[0] for q in pts]
            med = [q[1] for q in pts]
            err = [[q[1] - q[2] for q in pts], [q[3] - q[1] for q in pts]]
            ax.errorbar(ms, med, yerr=err, marker="o", capsize=3, label=prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel(f"{mode} median ms")
        ax.set_title(f"{k}->{nn}, r={rank}, {dt} (adapters {adt}), dropout {p:g}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    r0 = rows[0] if rows else {}
    fig.suptitle(f"LoRA linear {mode} — {r0.get('device', '')} (torch {r0.get('torch_version', '')})", fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="benchmark CSV -> markdown table and PNG plot")
    ap.add_argument("csv", type=Path)
    ap.add_argument("--md", type=Path, help="write the markdown here (default: print only)")
    ap.add_argument("--plot", type=Path, help="write the PNG here")
    ap.add_argument("--mode", default="fwd+bwd", help="mode plotted (default fwd+bwd)")
    ap.add_argument("--all-runs", action="store_true", help="every run in the file, not only the latest")
    ap.add_argument("--run", help="one run: its run_id (or a prefix of it)")
    a = ap.parse_args(argv)
    rows = read_csv(a.csv, a.all_runs, a.run)
    text = markdown(rows)
    if a.md:
        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text(text)
    if a.plot:
        plot(rows, a.plot, a.mode)
    print(text)
    return 1 if any(r.get("check", "").startswith("MISMATCH") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
