"""The user's labelled data for ``lora-kernels compare --data FILE``: JSONL or CSV, read and checked line by line.

Formats (chosen by the file's extension, or ``fmt``):

* JSONL (``.jsonl``, ``.ndjson``): one JSON object per line, e.g. ``{"text": "...", "label": "sport"}``; blank
  lines are skipped.
* CSV (``.csv``): a header row naming the columns, then one row per example (quoted fields may span lines).

Fields: ``text_field`` (a non-empty string), ``label_field`` (a string or an integer; classes are the distinct
values, sorted numerically when every one is an integer, else alphabetically) and, optionally, ``split_field``
(``train`` or ``test``, on every row or on none). Without a split the caller makes a seeded stratified one
(:func:`lora_kernels.training.classify.data.stratified_split`).

Every problem is a :class:`DataFileError` whose message starts with ``file:line`` (the line where the offending
record starts) and says what was expected; nothing is skipped silently.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .data import TextDataset

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
SPLITS = ("train", "test")
_INT = re.compile(r"[+-]?\d+")


class DataFileError(ValueError):
    """The ``--data`` file is missing, unreadable or malformed; the message names the file and line."""


@dataclass
class LabelledFile:
    """All examples of the file, in file order; ``split[i]`` is ``"train"``/``"test"``, or ``split`` is None."""

    data: TextDataset
    split: list[str] | None
    path: Path

    def where(self, i: int) -> str:
        """``file:line`` of example ``i`` (its id)."""
        return self.data.ids[i]


def _format_of(path: Path, fmt: str) -> str:
    if fmt in ("jsonl", "csv"):
        return fmt
    if fmt != "auto":
        raise DataFileError(f"data format must be 'auto', 'jsonl' or 'csv', got {fmt!r}")
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataFileError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}: name it .jsonl or .csv, "
            "or pass --data-format jsonl|csv"
        )
    return found


def _read_text(path: Path, encoding: str) -> str:
    if not path.is_file():
        raise DataFileError(f"{path}: no such file (--data expects a JSONL or CSV file)")
    raw = path.read_bytes()
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        encoding = "utf-8-sig"  # tolerate a byte-order mark (spreadsheet exports)
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataFileError(f"unknown encoding {encoding!r} (--encoding)") from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataFileError(
            f"{path}:{line}: byte 0x{raw[e.start]:02x} at column {col} is not valid {e.encoding}: "
            "re-save the file as UTF-8 or pass its encoding with --encoding (e.g. latin-1)"
        ) from None


def _jsonl_records(path: Path, text: str):
    """``(line, dict)`` per non-blank line."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataFileError(f"{path}:{lineno}: each line must be a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def _csv_records(path: Path, text: str, needed: tuple[str, ...]):
    """``(line, dict)`` per row; the line is where the row starts (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataFileError(f"{path}: empty file: expected a header row naming the columns {list(needed)}") from None
    except csv.Error as e:
        raise DataFileError(f"{path}:1: bad CSV header ({e})") from None
    header = [h.strip() for h in header]
    missing = [f for f in needed if f not in header]
    if missing:
        raise DataFileError(
            f"{path}:1: no column {missing[0]!r} in the header (columns: {header}); "
            "name the right one with --text-field / --label-field"
        )
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataFileError(f"{path}:{start}: bad CSV ({e})") from None
        if row and any(cell.strip() for cell in row):
            if len(row) != len(header):
                raise DataFileError(
                    f"{path}:{start}: {len(row)} fields, the header has {len(header)} "
                    "(quote fields that contain commas)"
                )
            yield start, dict(zip(header, row))
        start = reader.line_num + 1


def _label_key(path: Path, lineno: int, field: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFileError(
            f"{path}:{lineno}: label field {field!r} must be a string or an integer, got {json.dumps(value)}"
        )
    key = str(value).strip()
    if not key:
        raise DataFileError(f"{path}:{lineno}: empty label in field {field!r}")
    return key


def _sorted_classes(keys: set[str]) -> tuple[str, ...]:
    if all(_INT.fullmatch(k) for k in keys):
        return tuple(sorted(keys, key=int))
    return tuple(sorted(keys))


def _check_splits(path: Path, lines: list[int], splits: list[str | None], field: str) -> list[str] | None:
    have = [s is not None for s in splits]
    if not any(have):
        return None
    if not all(have):
        with_split = lines[have.index(True)]
        without = lines[have.index(False)]
        raise DataFileError(
            f"{path}:{without}: no {field!r} field, but line {with_split} has one: give every example a split "
            "(train/test) or none (then a seeded stratified split is made)"
        )
    for want in SPLITS:
        if want not in splits:
            raise DataFileError(f"{path}: no example has {field}={want!r}: both a train and a test split are needed")
    return splits  # type: ignore[return-value]


def load_labelled_file(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    split_field: str = "split",
    fmt: str = "auto",
    encoding: str = "utf-8",
) -> LabelledFile:
    """Read and check every example of ``path``. Raises :class:`DataFileError` naming file and line."""
    path = Path(path)
    kind = _format_of(path, fmt)
    text = _read_text(path, encoding)
    if kind == "jsonl":
        records = _jsonl_records(path, text)
    else:
        records = _csv_records(path, text, (text_field, label_field))
    texts, keys, lines, splits = [], [], [], []
    for lineno, rec in records:
        for field in (text_field, label_field):
            if field not in rec:
                raise DataFileError(
                    f"{path}:{lineno}: no {field!r} field (fields: {sorted(rec)}); "
                    "name the right one with --text-field / --label-field"
                )
        body = rec[text_field]
        if not isinstance(body, str):
            raise DataFileError(f"{path}:{lineno}: text field {text_field!r} must be a string, got {json.dumps(body)}")
        if not body.strip():
            raise DataFileError(f"{path}:{lineno}: empty text in field {text_field!r}")
        split = rec.get(split_field)
        if split is not None and (not isinstance(split, str) or split.strip().lower() not in SPLITS):
            raise DataFileError(f"{path}:{lineno}: {split_field!r} must be 'train' or 'test', got {json.dumps(split)}")
        texts.append(body.strip())
        keys.append(_label_key(path, lineno, label_field, rec[label_field]))
        lines.append(lineno)
        splits.append(split.strip().lower() if split is not None else None)
    if not texts:
        raise DataFileError(f"{path}: no examples (expected one {kind.upper()} record per example)")
    classes = _sorted_classes(set(keys))
    if len(classes) < 2:
        raise DataFileError(
            f"{path}: only one class ({classes[0]!r} in field {label_field!r}) across {len(texts)} examples: "
            "classification needs at least 2"
        )
    index = {c: i for i, c in enumerate(classes)}
    ids = [f"{path}:{n}" for n in lines]
    split = _check_splits(path, lines, splits, split_field)
    return LabelledFile(TextDataset(texts, [index[k] for k in keys], ids, classes), split, path)


def train_test(lf: LabelledFile, test_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """The file's own split if it has one, else a stratified split seeded by ``seed`` (a pure function of it)."""
    from .data import stratified_split

    ds = lf.data
    if lf.split is not None:
        tr = [i for i, s in enumerate(lf.split) if s == "train"]
        te = [i for i, s in enumerate(lf.split) if s == "test"]
        seen = {ds.labels[i] for i in tr}
        for i in te:
            if ds.labels[i] not in seen:
                raise DataFileError(
                    f"{lf.where(i)}: class {ds.label_names[ds.labels[i]]!r} is in the test split only: "
                    "every test class needs training examples"
                )
        if len(seen) < 2:
            raise DataFileError(f"{lf.path}: the train split has one class only; classification needs at least 2")
        return ds.subset(tr), ds.subset(te)
    counts = [ds.labels.count(c) for c in range(len(ds.label_names))]
    for c, n in enumerate(counts):
        if n < 2:
            first = ds.labels.index(c)
            raise DataFileError(
                f"{lf.where(first)}: class {ds.label_names[c]!r} has {n} example: too few to put one in both the "
                "train and the test split (give it more examples, or a split field)"
            )
    try:
        tr, te = stratified_split(ds.labels, test_fraction, seed, ds.label_names)
    except ValueError as e:  # a class too small for this fraction
        raise DataFileError(f"{lf.path}: {e}") from None
    return ds.subset(tr), ds.subset(te)
