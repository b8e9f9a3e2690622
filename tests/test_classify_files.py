"""``lora-kernels compare --data FILE``: reading JSONL/CSV, every bad-file case with its file:line message, and the
seeded stratified split as a pure function of the seed. No model is involved: milliseconds."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest
import torch

from lora_kernels.training.classify import data as D
from lora_kernels.training.classify.files import DataFileError, load_labelled_file, train_test


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_string_and_int_labels(tmp_path):
    rows = [{"text": f"doc {i}", "label": lab} for i, lab in enumerate(["b", "a", "b", "c", "a"])]
    lf = load_labelled_file(_jsonl(tmp_path / "d.jsonl", rows))
    assert lf.data.label_names == ("a", "b", "c") and lf.data.labels == [1, 0, 1, 2, 0]
    assert lf.data.texts[0] == "doc 0" and lf.split is None
    assert lf.data.ids[3] == f"{tmp_path / 'd.jsonl'}:4"
    # integer labels sort numerically (2 before 10), and 1 and "1" are the same class
    rows = [{"text": "x", "label": v} for v in (10, 2, "1", 1, 2)]
    lf = load_labelled_file(_jsonl(tmp_path / "i.jsonl", rows))
    assert lf.data.label_names == ("1", "2", "10") and lf.data.labels == [2, 1, 0, 0, 1]


def test_csv_quoting_bom_renamed_fields_and_split(tmp_path):
    path = tmp_path / "d.csv"
    body = 'id,body,topic,part\n1,"a, quoted\nmulti-line text",sport,train\n2,plain,tech,TEST\n\n3,more,sport,train\n4,bits,tech,train\n'
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())  # a spreadsheet's byte-order mark
    lf = load_labelled_file(path, text_field="body", label_field="topic", split_field="part")
    assert lf.data.texts == ["a, quoted\nmulti-line text", "plain", "more", "bits"]
    assert lf.data.label_names == ("sport", "tech") and lf.split == ["train", "test", "train", "train"]
    assert [i.rsplit(":", 1)[1] for i in lf.data.ids] == ["2", "4", "6", "7"]  # the line each record starts on
    tr, te = train_test(lf, 0.5, seed=0)  # the file's split wins over the fraction
    assert tr.texts == ["a, quoted\nmulti-line text", "more", "bits"] and te.texts == ["plain"]


def test_latin1_with_encoding_option(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ncaf\xe9,a\nb\xe9b\xe9,b\n".encode("latin-1"))
    lf = load_labelled_file(path, encoding="latin-1")
    assert lf.data.texts == ["café", "bébé"]


OK = ['{"text": "fine", "label": "a"}', '{"text": "also fine", "label": "b"}']
# (file name, content, load kwargs, message regex after the path): one entry per kind of bad file
BAD = {
    "missing text field": ("d.jsonl", [*OK, '{"body": "x", "label": "a"}'], {}, r":3: no 'text' field"),
    "missing label field": ("d.jsonl", ['{"text": "x"}', *OK], {}, r":1: no 'label' field"),
    "renamed field absent": ("d.jsonl", OK, {"text_field": "body"}, r":1: no 'body' field .*--text-field"),
    "missing csv column": ("d.csv", "txt,label\nx,a\ny,b\n", {}, r":1: no column 'text' in the header"),
    "one class only": ("d.jsonl", [OK[0], OK[0], OK[0]], {}, r": only one class \('a' in field 'label'\)"),
    "empty text": ("d.jsonl", [OK[0], '{"text": "  ", "label": "b"}'], {}, r":2: empty text in field 'text'"),
    "empty text csv": ("d.csv", "text,label\nx,a\n,b\n", {}, r":3: empty text"),
    "empty label": ("d.csv", "text,label\nx,a\ny,\n", {}, r":3: empty label"),
    "bad json": ("d.jsonl", [OK[0], '{"text": "x", "label": }', OK[1]], {}, r":2: not valid JSON"),
    "json not an object": ("d.jsonl", [*OK, '["x", "a"]'], {}, r":3: each line must be a JSON object, got list"),
    "text not a string": ("d.jsonl", [*OK, '{"text": 5, "label": "a"}'], {}, r":3: text field 'text' must be a str"),
    "float label": ("d.jsonl", [*OK, '{"text": "x", "label": 1.5}'], {}, r":3: .*string or an integer, got 1.5"),
    "null label": ("d.jsonl", ['{"text": "x", "label": null}', *OK], {}, r":1: .*got null"),
    "bool label": ("d.jsonl", [*OK, '{"text": "x", "label": true}'], {}, r":3: .*got true"),
    "csv field count": ("d.csv", "text,label\nx,a\nno, quotes, here,b\n", {}, r":3: 4 fields, the header has 2"),
    "csv open quote": ("d.csv", 'text,label\nx,a\n"never closed,b\n', {}, r":3: bad CSV \(unexpected end"),
    "bad split value": ("d.jsonl", [*OK, '{"text": "x", "label": "a", "split": "dev"}'], {}, r":3: 'split' must be"),
    "split on some rows": (
        "d.jsonl",
        [OK[0], '{"text": "x", "label": "a", "split": "train"}', OK[1]],
        {},
        r":1: no 'split' field, but line 2 has one",
    ),
    "no test split": (
        "d.jsonl",
        ['{"text": "x", "label": "a", "split": "train"}', '{"text": "y", "label": "b", "split": "train"}'],
        {},
        r": no example has split='test'",
    ),
    "latin-1 bytes": ("d.csv", b"text,label\nok,a\ncaf\xe9,b\n", {}, r":3: byte 0xe9 at column 4 is not valid utf-8"),
    "blank jsonl": ("d.jsonl", ["", "  "], {}, r": no examples"),
    "empty csv": ("d.csv", "", {}, r": empty file"),
    "unknown extension": ("d.txt", OK, {}, r": cannot tell the format from the extension '.txt'"),
}


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, list):
        _jsonl(path, content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_message_names_file_and_line(tmp_path, case):
    name, content, kwargs, pattern = BAD[case]
    path = _write(tmp_path, name, content)
    with pytest.raises(DataFileError) as err:
        load_labelled_file(path, **kwargs)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    assert re.search(pattern, msg[len(str(path)) :]), msg


def test_split_level_errors(tmp_path):
    rows = [
        '{"text": "a1", "label": "a", "split": "train"}',
        '{"text": "b1", "label": "b", "split": "train"}',
        '{"text": "c1", "label": "c", "split": "test"}',
    ]
    lf = load_labelled_file(_jsonl(tmp_path / "s.jsonl", rows))
    with pytest.raises(DataFileError, match=r"s\.jsonl:3: class 'c' is in the test split only"):
        train_test(lf, 0.2, 0)
    rows = [{"text": f"t{i}", "label": "big"} for i in range(5)] + [{"text": "lonely", "label": "small"}]
    lf = load_labelled_file(_jsonl(tmp_path / "one.jsonl", rows))
    with pytest.raises(DataFileError, match=r"one\.jsonl:6: class 'small' has 1 example"):
        train_test(lf, 0.2, 0)
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate("aabbb")]
    lf = load_labelled_file(_jsonl(tmp_path / "few.jsonl", rows))
    with pytest.raises(DataFileError, match=r"class 'a' has 2 examples: too few for test_fraction=0.8"):
        train_test(lf, 0.8, 0)
    with pytest.raises(DataFileError, match="no such file"):
        load_labelled_file(tmp_path / "absent.jsonl")
    with pytest.raises(DataFileError, match="unknown encoding 'klingon'"):
        load_labelled_file(tmp_path / "few.jsonl", encoding="klingon")


LABELS = [0] * 23 + [1] * 9 + [2] * 14 + [1] * 4  # classes interleaved, counts 23 / 13 / 14


def test_stratified_split_counts_and_seed():
    tr, te = D.stratified_split(LABELS, 0.2, seed=5)
    assert sorted(tr + te) == list(range(len(LABELS))) and not set(tr) & set(te)
    assert tr == sorted(tr) and te == sorted(te)
    assert [sum(LABELS[i] == c for i in te) for c in range(3)] == [5, 3, 3]  # round(0.2 n) per class
    splits = {tuple(D.stratified_split(LABELS, 0.2, seed=s)[1]) for s in range(6)}
    assert len(splits) == 6  # the seed moves the split


def test_stratified_split_is_a_pure_function_of_the_seed():
    labels = list(LABELS)
    want = D.stratified_split(labels, 0.3, seed=11)
    for global_seed in (0, 1, 12345):  # no global random state is read
        torch.manual_seed(global_seed)
        random.seed(global_seed)
        torch.rand(7)
        assert D.stratified_split(labels, 0.3, seed=11) == want
    assert labels == LABELS  # the input is not modified
    code = (
        "import torch; torch.manual_seed(999); torch.randperm(50)\n"
        "from lora_kernels.training.classify.data import stratified_split\n"
        f"print(stratified_split({LABELS!r}, 0.3, 11))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(want)  # same in a fresh process with another global seed


def test_file_split_depends_only_on_the_seed(tmp_path):
    rows = [{"text": f"article {i}", "label": "abc"[i % 3]} for i in range(30)]
    lf = load_labelled_file(_jsonl(tmp_path / "d.jsonl", rows))
    tr0, te0 = train_test(lf, 0.2, seed=3)
    torch.manual_seed(77)
    tr1, te1 = train_test(load_labelled_file(tmp_path / "d.jsonl"), 0.2, seed=3)
    assert (tr0.texts, te0.texts) == (tr1.texts, te1.texts)
    assert len(te0) == 6 and sorted(te0.labels) == [0, 0, 1, 1, 2, 2]
    assert te0.texts != train_test(lf, 0.2, seed=4)[1].texts
