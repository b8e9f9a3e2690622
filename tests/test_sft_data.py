"""SFT data: JSONL shapes, assistant-only labels, truncation, packing (= unpacked loss), bad data named."""

import json
import types

import pytest
import torch

from lora_kernels.models import byte_tokenizer, tiny_random
from lora_kernels.training.sft.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    encode_conversation,
    load_conversations,
    load_jsonl,
    pack_examples,
    packed_mask_kind,
    prepare_data,
)
from lora_kernels.training.sft.evaluation import compute_loss_sum

# SmolLM2-Instruct's template: a default system turn when none is given.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    t = byte_tokenizer()
    t.chat_template = SMOL_TEMPLATE
    return t


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4, ünïcode"},
]


@pytest.mark.parametrize("template", ["smol", "fallback"])
@pytest.mark.parametrize("conv", [CONV, CONV[1:], CONV[1:3]], ids=["system+2turns", "2turns", "1turn"])
def test_labels_are_exactly_the_assistant_tokens(tok, template, conv):
    tok.chat_template = SMOL_TEMPLATE if template == "smol" else FALLBACK_CHAT_TEMPLATE
    ids, labels = encode_conversation(tok, conv)
    assert len(ids) == len(labels)
    # the ids spell the whole rendered conversation
    assert tok.decode(ids) == tok.apply_chat_template(conv, tokenize=False)
    # labelled positions carry their own token id; everything else is -100
    assert all(lab == i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX)
    # and the labelled tokens spell exactly the assistant turns (content + end-of-turn marker), in order
    supervised = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    expected = "".join(m["content"] + "<|im_end|>\n" for m in conv if m["role"] == "assistant")
    assert supervised == expected
    # the prompt side (system, user turns, "<|im_start|>assistant\n" headers) is fully masked
    masked = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert "Hi there" in masked and "<|im_start|>assistant\n" in masked and "Hello!" not in masked


def test_jsonl_three_shapes(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi", "output": "hi", "system": "terse"},
            {"prompt": "Capital of France?", "completion": "Paris"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ],
    )
    convs = load_jsonl(path)
    assert convs[0] == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert convs[1][0] == {"role": "system", "content": "terse"}
    assert convs[2][1] == {"role": "assistant", "content": "Paris"}
    assert convs[3][0]["content"] == "a"


@pytest.mark.parametrize(
    "records, needle",
    [
        ([], "empty"),
        ([{"prompt": "q", "completion": "a", "score": 1}], r"unknown field\(s\) \['score'\]"),
        ([{"question": "q", "answer": "a"}], "unrecognised record"),
        ([{"messages": [{"role": "user", "content": "only a question"}]}], "no assistant turn"),
        ([{"prompt": "q", "completion": ""}], "no assistant turn"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "role 'bot'"),
        ([{"messages": [{"role": "assistant", "content": "x"}]}], "first non-system turn"),
        ([{"prompt": 3, "completion": "a"}], "'prompt' must be a string"),
    ],
)
def test_bad_jsonl_is_named(tmp_path, records, needle):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "completion": "ok"}] + records)
    if not records:
        path.write_text("\n\n")
    with pytest.raises(DataError, match=needle) as e:
        load_jsonl(path)
    if records:
        assert "bad.jsonl:2" in str(e.value)  # the message names file and line


def test_bad_dataset_paths(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="neither a built-in"):
        load_conversations("no-such-dataset")
    (tmp_path / "x.jsonl").write_text("{not json}\n")
    with pytest.raises(DataError, match=r"x.jsonl:1: invalid JSON"):
        load_jsonl(tmp_path / "x.jsonl")


def test_chatterbot_builtin_loads():
    pytest.importorskip("chatterbot_corpus")
    convs = load_conversations("chatterbot", "english")
    assert len(convs) > 500
    assert all(c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in convs)
    assert len({tuple(m["content"] for m in c) for c in convs}) == len(convs)  # deduplicated


def _cfg(path, **kw):
    base = dict(
        dataset=str(path),
        dataset_language="english",
        system_prompt=None,
        seed=0,
        eval_size=2,
        max_examples=None,
        max_len=64,
        packing=False,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_truncation_is_counted_and_split_is_seeded(tmp_path, tok):
    tok.chat_template = SMOL_TEMPLATE
    recs = [{"prompt": f"q{i}", "completion": "a" * (5 + 10 * i)} for i in range(10)]
    path = _write_jsonl(tmp_path / "d.jsonl", recs)
    data = prepare_data(_cfg(path, max_len=80), tok, log=lambda *_: None)
    lens = [len(encode_conversation(tok, c)[0]) for c in load_jsonl(path)]
    assert data.stats.n_truncated == sum(n > 80 for n in lens)
    assert all(len(r[0]) <= 80 for r in data.train_rows)
    again = prepare_data(_cfg(path, max_len=80), tok, log=lambda *_: None)
    assert [r[0].input_ids for r in again.train_rows] == [r[0].input_ids for r in data.train_rows]
    other = prepare_data(_cfg(path, max_len=80, seed=1), tok, log=lambda *_: None)
    assert [r[0].input_ids for r in other.eval_rows] != [r[0].input_ids for r in data.eval_rows]
    with pytest.raises(DataError, match="eval_size"):
        prepare_data(_cfg(path, eval_size=10), tok, log=lambda *_: None)
    # a max_len so short that no assistant token survives -> error before training
    with pytest.raises(DataError, match="no training example"):
        prepare_data(_cfg(path, max_len=10), tok, log=lambda *_: None)


def test_collate_shifts_targets_per_example_and_masks_across_examples():
    a = Example([1, 2, 3], [IGNORE_INDEX, 2, 3])
    b = Example([4, 5], [IGNORE_INDEX, 5])
    batch = collate([[a, b]], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # last token of `a` does not predict the first of `b`
    assert batch["targets"].tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]]
    allowed = batch["attention_mask"][0, 0] == 0
    assert torch.equal(collate([[a, b]], pad_id=0, mask_kind="bool")["attention_mask"][0, 0], allowed)
    expect = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(allowed, expect)
    assert batch["n_targets"] == 3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_equals_unpacked_loss_and_grads(attn):
    model, tok = tiny_random(seed=3)
    model.config._attn_implementation = attn
    kind = packed_mask_kind(model)
    assert kind == {"sdpa": "bool", "eager": "additive"}[attn]
    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    convs = [
        [{"role": "user", "content": f"q{i} " * (i + 1)}, {"role": "assistant", "content": "ans " * i + "!"}]
        for i in range(7)
    ]
    examples = [Example(*encode_conversation(tok, c)) for c in convs]
    packed_rows = pack_examples(examples, max_len=160)
    assert len(packed_rows) < len(examples) and any(len(r) > 1 for r in packed_rows)
    unpacked_rows = [[e] for e in examples]

    def loss_and_grads(rows):
        model.zero_grad()
        batch = collate(rows, tok.pad_token_id, kind)
        loss = compute_loss_sum(model, batch) / batch["n_targets"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    lp, gp = loss_and_grads(packed_rows)
    lu, gu = loss_and_grads(unpacked_rows)
    # fp32; the only difference is summation order inside the attention / matmuls (row lengths differ):
    # a few ulps of the O(1) loss and of the O(1e-2) grads
    torch.testing.assert_close(lp, lu, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp, gu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the mask matters: without it (plain causal over the packed row) the loss differs
    batch = collate(packed_rows, tok.pad_token_id, kind)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        wrong = compute_loss_sum(model, batch) / batch["n_targets"]
    assert abs(float(wrong) - float(lu)) > 1e-3
