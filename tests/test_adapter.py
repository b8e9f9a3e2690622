"""PEFT adapter format, both ways, on a tiny random Llama: logits equal to 1e-5 in fp32.

Both sides compute the same fp32 operations on the same weights, so the logits agree to fp32 rounding
(~1e-7 relative here); 1e-5 is the issue's bound for the round trip.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from lora_kernels import apply_lora, load_adapter, lora_modules, save_adapter
from lora_kernels.adapters.io import CONFIG_NAME, WEIGHTS_NAME
from lora_kernels.models import tiny_llama

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install peft)")
pytest.importorskip("transformers", reason="transformers is a test dependency")

ATOL = 1e-5


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _tokens(shape=(2, 11), seed=0):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _train_steps(model, steps=2, lr=0.05):
    """A few SGD steps so that A, B (and modules_to_save) hold non-trivial trained values."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        x = _tokens(seed=100 + i)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(target_modules="all-linear", r=4, lora_alpha=8), id="all-linear"),
        pytest.param(dict(target_modules=["q_proj", "v_proj"], r=3, lora_alpha=5, use_rslora=True), id="qv-rslora"),
        pytest.param(
            dict(target_modules=r".*mlp\..*_proj", r=4, lora_alpha=16, lora_dropout=0.1, modules_to_save=["lm_head"]),
            id="regex-dropout-modules_to_save",
        ),
    ],
)
def test_ours_to_peft_same_logits(base, tmp_path, kwargs):
    model = copy.deepcopy(base)
    apply_lora(model, **kwargs)
    _train_steps(model)
    assert all(m.lora_B.weight.abs().sum() > 0 for m in lora_modules(model).values())
    save_adapter(model, tmp_path)
    x = _tokens(seed=7)
    with torch.no_grad():
        ours = model(x).logits
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        theirs = pm(x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)
    # and PEFT put LoRA exactly where we did
    peft_names = {
        n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert peft_names == set(lora_modules(model))


def test_saved_files_have_peft_keys_shapes_and_config(base, tmp_path):
    model = copy.deepcopy(base)
    report = apply_lora(model, target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8, modules_to_save=["lm_head"])
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        assert f.metadata() == {"format": "pt"}
    expected = {"base_model.model.lm_head.weight": (96, 32)}
    for name in report.replaced:
        m = model.get_submodule(name)
        expected[f"base_model.model.{name}.lora_A.weight"] = (4, m.in_features)
        expected[f"base_model.model.{name}.lora_B.weight"] = (m.out_features, 4)
    assert shapes == expected
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8, False)
    assert cfg["target_modules"] == report.replaced and cfg["modules_to_save"] == ["lm_head"]
    assert cfg["base_model_name_or_path"] == "tiny-llama"
    # PEFT's own parser accepts it
    lc = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert lc.r == 4 and set(lc.target_modules) == set(report.replaced)


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(dict(target_modules="all-linear", r=4, lora_alpha=8), id="all-linear"),
        pytest.param(dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=3, use_rslora=True), id="qv-rslora"),
        pytest.param(
            dict(target_modules=["o_proj", "up_proj"], r=4, lora_alpha=8, modules_to_save=["lm_head"]),
            id="modules_to_save",
        ),
        pytest.param(dict(target_modules=r"model\.layers\.1\..*_proj", r=4, lora_alpha=8), id="regex"),
    ],
)
def test_peft_to_ours_same_logits(base, tmp_path, cfg):
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **cfg))
    _train_steps(pm)
    pm.save_pretrained(str(tmp_path))
    model = copy.deepcopy(base)
    result = load_adapter(model, tmp_path)
    assert result.injected and not result.missing_keys and not result.unexpected_keys
    x = _tokens(seed=3)
    with torch.no_grad():
        theirs = pm(x).logits
        ours = model(x).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    # trainable set as after apply_lora
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith(tuple(cfg.get("modules_to_save", []))) for n in trainable)


def test_load_into_model_with_lora_replaces_weights(base, tmp_path):
    src = copy.deepcopy(base)
    apply_lora(src, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    save_adapter(src, tmp_path)
    dst = copy.deepcopy(base)
    apply_lora(dst, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    result = load_adapter(dst, tmp_path)
    assert not result.injected and len(result.loaded_keys) == 2 * 2 * 2
    for name, m in lora_modules(dst).items():
        assert torch.equal(m.lora_B.weight, src.get_submodule(name).lora_B.weight)
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(dst(x).logits, src(x).logits, rtol=0, atol=0)


def test_round_trip_ours_to_ours_with_bf16_adapter(base, tmp_path):
    src = copy.deepcopy(base)
    apply_lora(src, r=4, init_lora_weights=False, adapter_dtype=torch.bfloat16)
    save_adapter(src, tmp_path)
    dst = copy.deepcopy(base)
    load_adapter(dst, tmp_path, adapter_dtype=torch.bfloat16)
    for name, m in lora_modules(dst).items():
        assert m.lora_A.weight.dtype == torch.bfloat16
        assert torch.equal(m.lora_A.weight, src.get_submodule(name).lora_A.weight)


def test_strict_false_reports_missing_and_unexpected(base, tmp_path):
    from safetensors.torch import load_file, save_file

    src = copy.deepcopy(base)
    apply_lora(src, target_modules=["q_proj"], r=4, init_lora_weights=False)
    save_adapter(src, tmp_path)
    path = tmp_path / WEIGHTS_NAME
    tensors = load_file(str(path))
    dropped = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    del tensors[dropped]
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    dst = copy.deepcopy(base)
    result = load_adapter(dst, tmp_path, strict=False)
    assert result.missing_keys == [dropped]
    assert result.unexpected_keys == ["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"]
    assert torch.equal(
        dst.model.layers[0].self_attn.q_proj.lora_B.weight, src.model.layers[0].self_attn.q_proj.lora_B.weight
    )
    assert torch.count_nonzero(dst.model.layers[1].self_attn.q_proj.lora_B.weight) == 0  # kept its init


def _tiny_seq_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    torch.manual_seed(1)
    return LlamaForSequenceClassification(cfg).eval()


def test_seq_cls_both_ways(tmp_path):
    """PEFT's SEQ_CLS configs list modules_to_save ['classifier', 'score'] (only 'score' exists here), and
    'all-linear' leaves the trained-in-full head out of the LoRA targets."""
    base = _tiny_seq_cls()
    x = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    # PEFT -> ours
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear")
    )
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                m.lora_B["default"].weight.normal_()
        pm.base_model.model.score.modules_to_save["default"].weight.normal_()
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "peft")
    assert "score" not in lora_modules(ours) and ours.lora_config.modules_to_save == ["score"]
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, pm(x).logits, rtol=0, atol=ATOL)
    # ours -> PEFT
    mine = copy.deepcopy(base)
    report = apply_lora(mine, target_modules="all-linear", r=4, modules_to_save=["score"], init_lora_weights=False)
    assert "score" not in report.replaced
    assert (
        report.trainable_params,
        report.total_params + mine.score.weight.numel(),
    ) == pm.get_nb_trainable_parameters()
    with torch.no_grad():
        mine.score.weight.add_(0.5)  # a trained head must travel with the adapter
        save_adapter(mine, tmp_path / "ours")
        pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(pm2(x).logits, mine(x).logits, rtol=0, atol=ATOL)
