"""Bad input to LoRALinear, apply_lora / merge_lora and load_adapter / save_adapter: the right exception type, a
message naming the argument / key / field, and the model left exactly as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lora_kernels import LoRALinear, apply_lora, load_adapter, lora_modules, merge_lora, save_adapter, unmerge_lora
from lora_kernels.adapters.io import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from lora_kernels.models import tiny_llama

pytest.importorskip("transformers", reason="transformers is a test dependency")


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture
def llama(base):
    return copy.deepcopy(base)


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "config": getattr(model, "lora_config", None),
    }


def _assert_untouched(model, snap):
    assert {n: type(m) for n, m in model.named_modules()} == snap["types"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snap["grad"]
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), f"{k} changed"
    assert getattr(model, "lora_config", None) is snap["config"]


# ------------------------------------------------------------------------------------------------ layer
@pytest.mark.parametrize("r", [0, -1, 2.5, True, "4", 17], ids=["0", "neg", "float", "bool", "str", "gt-min"])
def test_layer_bad_r(r):
    with pytest.raises(ValueError, match=r"\br\b") as e:
        LoRALinear.from_linear(nn.Linear(16, 32), r=r)
    if r == 17:
        assert "16" in str(e.value)  # names the limit min(in, out)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_layer_bad_dropout(p):
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear.from_linear(nn.Linear(8, 8), r=2, lora_dropout=p)


@pytest.mark.parametrize("alpha", [0, -1, float("inf"), float("nan"), "16", None])
def test_layer_bad_alpha(alpha):
    with pytest.raises(ValueError, match="lora_alpha"):
        LoRALinear.from_linear(nn.Linear(8, 8), r=2, lora_alpha=alpha)


@pytest.mark.parametrize("init", ["xavier", "pissa_niter_4", None, 1])
def test_layer_bad_init(init):
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear.from_linear(nn.Linear(8, 8), r=2, init_lora_weights=init)


@pytest.mark.parametrize("dt", [torch.int32, "float32", torch.bool])
def test_layer_bad_adapter_dtype(dt):
    with pytest.raises(TypeError, match="adapter_dtype"):
        LoRALinear.from_linear(nn.Linear(8, 8), r=2, adapter_dtype=dt)


def test_layer_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        LoRALinear.from_linear(nn.Linear(8, 8), r=2, backend="cudnn")


@pytest.mark.parametrize(
    "module", [nn.Conv1d(4, 4, 1), nn.Embedding(4, 4), LoRALinear(8, 8, r=2)], ids=["conv", "embedding", "lora"]
)
def test_from_linear_rejects_non_linear(module):
    with pytest.raises(TypeError, match="linear"):
        LoRALinear.from_linear(module, r=2)


def test_layer_forward_bad_input_names_argument():
    layer = LoRALinear.from_linear(nn.Linear(8, 6), r=2)
    with pytest.raises(ValueError, match=r"x\.shape\[-1\]"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="weight dtype"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        layer(torch.ones(3, 8, dtype=torch.int64))


def test_layer_empty_batch_works():
    layer = LoRALinear.from_linear(nn.Linear(8, 6), r=2, init_lora_weights=False)
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and torch.count_nonzero(layer.lora_A.weight.grad) == 0


# ----------------------------------------------------------------------------------------------- inject
def test_apply_requires_module():
    with pytest.raises(TypeError, match="model"):
        apply_lora({"q_proj": nn.Linear(2, 2)}, r=1)


@pytest.mark.parametrize(
    "targets,exc,match",
    [
        ([], TypeError, "target_modules"),
        (5, TypeError, "target_modules"),
        ([""], TypeError, "target_modules"),
        ("(unclosed", ValueError, "target_modules is not a valid regular expression"),
        (["qq_proj"], ValueError, r"target_modules=\['qq_proj'\] matched no module.*q_proj"),
        ("q_proj", ValueError, r"matched no module.*'q_proj'"),  # a string is a regex fullmatch, not a suffix
        (["mlp"], TypeError, r"'model\.layers\.0\.mlp' is a LlamaMLP, not an nn\.Linear"),
        (["embed_tokens"], TypeError, r"'model\.embed_tokens' is a Embedding"),
    ],
    ids=["empty", "int", "empty-name", "bad-regex", "no-match", "regex-no-match", "container", "embedding"],
)
def test_apply_bad_targets(llama, targets, exc, match):
    snap = _snapshot(llama)
    with pytest.raises(exc, match=match):
        apply_lora(llama, target_modules=targets, r=2)
    _assert_untouched(llama, snap)


def test_apply_r_too_large_for_one_module_leaves_model(llama):
    snap = _snapshot(llama)
    # k_proj is [16, 32]: r=20 fits q_proj (32x32) but not k_proj; nothing may be replaced
    with pytest.raises(ValueError, match=r"r=20 .*'model\.layers\.0\.self_attn\.k_proj'"):
        apply_lora(llama, target_modules="all-linear", r=20)
    _assert_untouched(llama, snap)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(r=0), ValueError, r"\br must be"),
        (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
        (dict(lora_alpha=-2), ValueError, "lora_alpha"),
        (dict(init_lora_weights="olora"), ValueError, "init_lora_weights"),
        (dict(adapter_dtype=torch.int8), TypeError, "adapter_dtype"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(exclude_modules=r".*proj"), ValueError, "exclude_modules='.*proj' removed every module"),
        (dict(modules_to_save=["head"]), ValueError, "modules_to_save entry 'head' matched no module"),
        (dict(modules_to_save=["q_proj"]), ValueError, "modules_to_save and target_modules both cover"),
        (dict(modules_to_save=5), TypeError, "modules_to_save"),
    ],
    ids=[
        "r",
        "dropout",
        "alpha",
        "init",
        "adapter_dtype",
        "backend",
        "exclude-all",
        "mts-none",
        "mts-overlap",
        "mts-int",
    ],
)
def test_apply_bad_arguments(llama, kwargs, exc, match):
    snap = _snapshot(llama)
    args = {"target_modules": ["q_proj"], "r": 2, **kwargs}
    with pytest.raises(exc, match=match):
        apply_lora(llama, **args)
    _assert_untouched(llama, snap)


def test_apply_twice_refused(llama):
    apply_lora(llama, target_modules=["q_proj"], r=2)
    snap = _snapshot(llama)
    with pytest.raises(ValueError, match="already has 2 LoRA modules"):
        apply_lora(llama, target_modules=["v_proj"], r=2)
    _assert_untouched(llama, snap)


def test_merge_and_unmerge_without_lora(llama):
    with pytest.raises(ValueError, match="no LoRA modules"):
        merge_lora(llama)
    with pytest.raises(ValueError, match="no LoRA modules"):
        unmerge_lora(llama)


def test_merge_lora_non_finite_in_last_module_leaves_every_weight(llama):
    apply_lora(llama, r=2, init_lora_weights=False)
    last = list(lora_modules(llama))[-1]
    with torch.no_grad():
        llama.get_submodule(last).lora_B.weight.fill_(1e30)
        llama.get_submodule(last).lora_A.weight.fill_(1e30)
    snap = _snapshot(llama)
    with pytest.raises(ValueError, match=rf"merge_lora: module '{last}'.*non-finite"):
        merge_lora(llama)
    _assert_untouched(llama, snap)
    assert not any(m.merged for m in lora_modules(llama).values())


# ---------------------------------------------------------------------------------------------- adapter
@pytest.fixture
def saved(base, tmp_path):
    """An adapter (r=4, alpha=8, q/v) saved by us, with random non-zero weights."""
    src = copy.deepcopy(base)
    apply_lora(src, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    save_adapter(src, tmp_path)
    return tmp_path


def _edit_tensors(path, fn):
    from safetensors.torch import load_file, save_file

    t = load_file(str(path / WEIGHTS_NAME))
    fn(t)
    save_file(t, str(path / WEIGHTS_NAME))


def _edit_config(path, **fields):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg.update(fields)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


KEY_B1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.pop(KEY_B1), rf"missing keys \['{KEY_B1}'\]"),
        (
            lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", torch.zeros(4, 32)),
            r"unexpected keys \['base_model\.model\.model\.layers\.0\.mlp\.up_proj\.lora_A\.weight'\]",
        ),
        (
            lambda t: t.__setitem__(KEY_B1, torch.zeros(16, 5)),
            rf"wrong shape.*{KEY_B1}: file \(16, 5\), expected \(16, 4\)",
        ),
        (lambda t: t.__setitem__(KEY_B1, torch.zeros(16, 4, dtype=torch.int32)), rf"{KEY_B1}.*not floating point"),
        (lambda t: t[KEY_B1].__setitem__((0, 0), float("nan")), rf"{KEY_B1}.*NaN or Inf"),
        (lambda t: t.__setitem__("lora_A.weight", torch.zeros(1)), "do not start with 'base_model.model.'"),
    ],
    ids=["missing", "extra", "misshaped", "int", "nan", "no-prefix"],
)
def test_load_bad_tensors_fresh_model_untouched(base, saved, edit, match):
    _edit_tensors(saved, edit)
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, saved)
    _assert_untouched(model, snap)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(r=8), r"r: adapter has 8, model module '.*' has 4"),
        (dict(lora_alpha=16), r"lora_alpha: adapter has 16, model module .* has 8"),
        (dict(use_rslora=True), r"use_rslora: adapter has True"),
        (dict(target_modules=["q_proj", "k_proj", "v_proj"]), r"target_modules: the adapter targets \[.*k_proj"),
        (dict(modules_to_save=["lm_head"]), r"modules_to_save: adapter has \['lm_head'\], model has \[\]"),
    ],
    ids=["r", "alpha", "rslora", "targets", "modules_to_save"],
)
def test_load_config_disagreeing_with_model_lora(base, saved, fields, match):
    model = copy.deepcopy(base)
    apply_lora(model, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    _edit_config(saved, **fields)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, saved)
    _assert_untouched(model, snap)


def test_load_config_r_disagreeing_with_tensors(base, saved):
    _edit_config(saved, r=8)
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"wrong shape.*lora_A\.weight: file \(4, 32\), expected \(8, 32\)"):
        load_adapter(model, saved)
    _assert_untouched(model, snap)


def test_load_config_targets_matching_nothing(base, saved):
    _edit_config(saved, target_modules=["query_key_value"])
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="target_modules=.*matched no module"):
        load_adapter(model, saved)
    _assert_untouched(model, snap)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(peft_type="IA3"), "'peft_type' must be 'LORA'"),
        (dict(use_dora=True), "'use_dora' = True is not supported"),
        (dict(rank_pattern={"q_proj": 8}), "'rank_pattern'"),
        (dict(bias="all"), "'bias' = 'all'"),
        (dict(fan_in_fan_out=True), "'fan_in_fan_out'"),
        (dict(r=0), r"r must be a positive int"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(target_modules=7), "'target_modules' must be a string or a list"),
    ],
    ids=["peft_type", "dora", "rank_pattern", "bias", "fan_in_fan_out", "r0", "dropout", "targets-type"],
)
def test_load_unsupported_or_bad_config_fields(base, saved, fields, match):
    _edit_config(saved, **fields)
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match) as e:
        load_adapter(model, saved)
    assert CONFIG_NAME in str(e.value)
    _assert_untouched(model, snap)


def test_load_missing_config_field(base, saved):
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    del cfg["lora_alpha"]
    (saved / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="required field 'lora_alpha' is missing"):
        load_adapter(copy.deepcopy(base), saved)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"\x00" * 8 + b[8:],  # header length zeroed
        lambda b: b"not a safetensors file at all",
        lambda b: b[:8] + b"[" + b[9:],  # header JSON no longer an object
    ],
    ids=["truncated", "zero-header-len", "garbage", "bad-header"],
)
def test_load_corrupt_safetensors(base, saved, damage):
    path = saved / WEIGHTS_NAME
    path.write_bytes(damage(path.read_bytes()))
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} is not a readable safetensors file"):
        load_adapter(model, saved)
    _assert_untouched(model, snap)


def test_load_bad_json(base, saved):
    (saved / CONFIG_NAME).write_text("{r: 4,")
    with pytest.raises(ValueError, match=f"{CONFIG_NAME} is not valid JSON"):
        load_adapter(copy.deepcopy(base), saved)


def test_load_refuses_pickle(base, saved):
    (saved / WEIGHTS_NAME).rename(saved / PICKLE_NAME)
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="safetensors only"):
        load_adapter(model, saved)
    _assert_untouched(model, snap)


def test_load_missing_directory_and_files(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(copy.deepcopy(base), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.raises(TypeError, match="directory must be a path"):
        load_adapter(copy.deepcopy(base), 42)


def test_load_into_merged_model_refused(base, saved):
    model = copy.deepcopy(base)
    apply_lora(model, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    for m in lora_modules(model).values():
        m.merge()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_adapter(model, saved)
    _assert_untouched(model, snap)


def test_save_without_lora(base, tmp_path):
    with pytest.raises(ValueError, match="no LoRA modules"):
        save_adapter(copy.deepcopy(base), tmp_path)
    assert not list(tmp_path.iterdir())
