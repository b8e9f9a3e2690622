"""``lora-kernels compare`` on the user's data, several seeds: the whole command on tiny JSONL and CSV files with the
random tiny BERT (seconds, no downloaded model), the statistics by hand, the output location and the errors."""

from __future__ import annotations

import csv
import json
import math

import pytest

from lora_kernels.training.classify.cli import DEFAULT_OUT, build_parser, main
from lora_kernels.training.classify.stats import Spread, all_pairs, compare_pair, summarize

WORDS = {
    "sport": "match goal team player coach score league win",
    "tech": "software chip phone internet computer data network code",
    "politics": "vote minister party election law government policy debate",
}


def _examples(n_per_class: int = 12):
    out = []
    for k in range(n_per_class):
        for label, words in WORDS.items():
            w = words.split()
            out.append({"text": f"the {w[k % 8]} and {w[(k * 3 + 1) % 8]} today {k}", "label": label})
    return out


def _tiny_jsonl(path):
    path.write_text("".join(json.dumps(r) + "\n" for r in _examples()))
    return path


def _tiny_csv(path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["headline", "topic", "part"])
        for i, r in enumerate(_examples()):
            w.writerow([r["text"] + ", reported", r["label"], "test" if i % 4 == 0 else "train"])
    return path


ARGS = ["--model", "tiny-bert", "--threads", "1"]


def _artefacts(out, prefix):
    for name in (f"{prefix}.md", f"{prefix}.csv", f"{prefix}_runs.csv", f"{prefix}.png", f"{prefix}.json"):
        assert (out / name).is_file(), name
    assert (out / f"{prefix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list(csv.DictReader(open(out / f"{prefix}_runs.csv")))
    summary = list(csv.DictReader(open(out / f"{prefix}.csv")))
    return runs, summary, (out / f"{prefix}.md").read_text(), json.loads((out / f"{prefix}.json").read_text())


def test_jsonl_through_the_whole_command(tmp_path):
    data = _tiny_jsonl(tmp_path / "news.jsonl")
    assert main(["compare", "--data", str(data), "--seeds", "2", "--out-dir", str(tmp_path), *ARGS]) == 0
    runs, summary, md, meta = _artefacts(tmp_path, "compare_news")
    names = ["full fine-tuning", "head only", "subspace r=32", "LoRA r=4", "LoRA r=16"]
    assert [r["name"] for r in runs] == names * 2  # interleaved: every method for seed 0, then for seed 1
    assert [int(r["seed"]) for r in runs] == [0] * 5 + [1] * 5
    assert [r["name"] for r in summary] == names
    for row in summary:
        mine = [float(r["accuracy"]) for r in runs if r["name"] == row["name"]]
        assert float(row["accuracy_mean"]) == pytest.approx(sum(mine) / 2)
        assert float(row["accuracy_std"]) == pytest.approx(abs(mine[0] - mine[1]) / math.sqrt(2))
        assert row["seeds"] == "2"
        assert len({r["trainable_params"] for r in runs if r["name"] == row["name"]}) == 1
    # 36 examples, 12 per class, stratified 20 %: round(2.4) = 2 test per class: 30 train (2 steps of 16) / 6 test
    assert {r["steps"] for r in runs} == {"2"}
    assert "30 train / 6 test examples (3 classes)" in md and "split: stratified, seed 0, 20% test" in md
    # the same seed gives every method the same data, so the same tokens; another seed, another order
    assert len({r["tokens"] for r in meta["runs"] if r["seed"] == 0}) == 1
    losses = {(r["name"], r["seed"]): r["losses"] for r in meta["runs"]}
    assert all(losses[(n, 0)] != losses[(n, 1)] for n in names)
    assert "± " in md and "## Differences between methods, paired by seed" in md
    assert len(meta["pairs"]) == 2 * 10  # 10 pairs of 5 methods, accuracy and macro-F1


def test_csv_with_split_and_renamed_fields_through_the_command(tmp_path):
    data = _tiny_csv(tmp_path / "topics.csv")
    args = ["compare", "--quick", "--data", str(data), "--text-field", "headline", "--label-field", "topic"]
    args += ["--split-field", "part", "--out-dir", str(tmp_path), "--methods", "LoRA r=4", "subspace r=32", *ARGS]
    assert main(args) == 0
    runs, summary, md, _ = _artefacts(tmp_path, "compare_topics_quick")
    assert [r["name"] for r in summary] == ["subspace r=32", "LoRA r=4"]  # config order
    assert len(runs) == 2 * 2  # --quick: 2 seeds
    assert "split: the file's 'part' field" in md
    # --quick asks for 20 of the 27 train rows (9 per class): round(9 * 20/27) = 7 per class; all 9 test rows kept
    assert "21 train / 9 test examples" in md


def test_a_seed_reproduces_its_run(tmp_path):
    data = _tiny_jsonl(tmp_path / "d.jsonl")
    common = ["compare", "--data", str(data), "--seeds", "1", "--methods", "LoRA r=4", *ARGS]
    assert main([*common, "--out-dir", str(tmp_path / "a")]) == 0
    assert main([*common, "--out-dir", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "compare_d.json").read_text())["runs"]
    b = json.loads((tmp_path / "b" / "compare_d.json").read_text())["runs"]
    assert a[0]["losses"] == b[0]["losses"] and a[0]["accuracy"] == b[0]["accuracy"]
    md = (tmp_path / "a" / "compare_d.md").read_text()
    assert "Differences between methods" not in md  # one seed: no spread to compare against


def test_outputs_default_under_runs_not_the_repository(tmp_path, monkeypatch):
    assert build_parser().parse_args(["compare"]).out_dir == DEFAULT_OUT == "runs/compare"
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--quick", "--task", "synthetic", "--threads", "1", "--methods", "head only"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "compare").iterdir()) == [
        f"compare_synthetic_quick{ext}" for ext in (".csv", ".json", ".md", ".png", "_runs.csv")
    ]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--seeds", "0"], "seeds must be an integer >= 1, got 0"),
        (["--test-fraction", "1.5"], "test_fraction must be a number in (0, 1), got 1.5"),
        (["--task", "synthetic"], "--data and --task synthetic: give one of them"),
        (["--methods", "nope"], "--methods names ['nope'] not in the config"),
        (["--text-field", "body"], "d.jsonl:1: no 'body' field"),
    ],
)
def test_command_errors_are_one_line_not_a_crash(tmp_path, capsys, extra, message):
    data = _tiny_jsonl(tmp_path / "d.jsonl")
    assert main(["compare", "--data", str(data), "--out-dir", str(tmp_path), *ARGS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-kernels compare: error: ") and message in err, err
    assert "Traceback" not in err and not list(tmp_path.glob("compare_*"))


def test_bad_data_file_through_the_command(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n')
    assert main(["compare", "--data", str(bad), "--out-dir", str(tmp_path), *ARGS]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


def _rows(acc: dict[str, list[float]]):
    return [
        {"name": n, "seed": s, "accuracy": v, "method": "x", "r": None, "trainable_params": 1, "total_params": 1}
        | {"trainable_pct": 100.0, "steps": 1, "macro_f1": v, "train_time_s": 1.0, "cpu_time_s": 1.0}
        | {"peak_mem_mib": 1.0, "tokens_per_s": 1.0, "final_loss": 1.0}
        for n, vals in acc.items()
        for s, v in enumerate(vals)
    ]


def test_spread_and_pairs_by_hand():
    s = Spread.of([0.90, 0.94, 0.92])
    assert s.mean == pytest.approx(0.92) and s.std == pytest.approx(0.02)  # sample std: sqrt((4+4)e-4 / 2)
    assert s.fmt(".3f") == "0.920 ± 0.020" and Spread.of([0.5]).fmt(".2f") == "0.50"
    assert math.isnan(Spread.of([0.5]).std)
    rows = _rows({"A": [0.95, 0.96, 0.97], "B": [0.90, 0.91, 0.92], "C": [0.94, 0.97, 0.93]})
    ab = compare_pair(rows, "A", "B")
    assert ab.diff.mean == pytest.approx(0.05) and ab.diff.std == pytest.approx(0.0, abs=1e-12)
    assert (ab.wins, ab.losses, ab.separated) == (3, 0, True)  # [0.95, 0.97] vs [0.90, 0.92]
    ac = compare_pair(rows, "A", "C")
    assert (ac.wins, ac.losses, ac.separated) == (2, 1, False)  # C: 0.9467 ± 0.0208 overlaps A
    pairs = {(p.a, p.b) for p in all_pairs(rows)}
    assert pairs == {("A", "B"), ("A", "C"), ("C", "B")}  # each oriented higher-first
    assert summarize(rows)["C"]["accuracy"].hi == 0.97
    with pytest.raises(ValueError, match="share no seed"):
        compare_pair(rows + [{**rows[0], "name": "D", "seed": 9}], "A", "D")
