"""Activation checkpointing (same losses, grads and dropout masks), low-precision frozen base, memory report."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_to_oracle
from torch import nn

from lora_kernels.adapters.inject import apply_lora
from lora_kernels.backends import mask as _rng
from lora_kernels.training.losses import causal_lm_loss
from lora_kernels.training.memory import (
    PeakMemory,
    cast_frozen_params,
    checkpoint_modules,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    estimate_activation_bytes,
    memory_report,
    uncheckpoint_modules,
)

VOCAB = 64


def _tiny_llama(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _lora_llama(dropout=0.2, seed=0):
    model = _tiny_llama(seed)
    apply_lora(model, "all-linear", r=3, lora_alpha=6, lora_dropout=dropout, init_lora_weights="gaussian")
    # B = 0 at init would make dropout invisible in the loss: give the adapters non-zero B.
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in model.named_parameters():
        if n.endswith("lora_B.weight"):
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return model.train()


def _batch(seed=3, b=2, t=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


def _loss_grads(model, ids, labels, seed=123, chunked=False):
    torch.manual_seed(seed)  # the dropout seeds come from here
    if chunked:
        loss = causal_lm_loss(model, ids, labels, chunk_size=5)
    else:
        loss = model(input_ids=ids, labels=labels).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


class _SeedLog:
    """Records every dropout seed drawn (forward and recomputed forward) by wrapping ``_rng.draw_seed``."""

    def __init__(self, monkeypatch):
        self.seeds: list[int] = []
        orig = _rng.draw_seed

        def draw(*a, **k):
            s = orig(*a, **k)
            self.seeds.append(s)
            return s

        monkeypatch.setattr(_rng, "draw_seed", draw)


@pytest.mark.parametrize("how", ["hf", "wrapper"])
def test_checkpointing_same_loss_grads_and_masks(how, monkeypatch):
    ids, labels = _batch()
    base = _lora_llama()
    ckpt = copy.deepcopy(base)
    if how == "hf":
        desc = enable_gradient_checkpointing(ckpt)
        assert "hf" in desc
    else:
        desc = enable_gradient_checkpointing(ckpt, ckpt.model.layers)
        assert "2 modules" in desc
    log = _SeedLog(monkeypatch)
    l0, g0 = _loss_grads(base, ids, labels)
    n_fwd = len(log.seeds)
    assert n_fwd == 2 * 7  # one seed per LoRA layer call: 2 layers x 7 linears
    forward_seeds = list(log.seeds)
    log.seeds.clear()
    l1, g1 = _loss_grads(ckpt, ids, labels)
    # the checkpointed run draws every seed twice: forward, then the recompute inside backward
    assert len(log.seeds) == 2 * n_fwd
    assert log.seeds[:n_fwd] == forward_seeds
    recomputed = log.seeds[n_fwd:]
    # recomputes run layer by layer in reverse order; within a layer in forward order
    per_layer = [forward_seeds[i * 7 : (i + 1) * 7] for i in range(2)]
    assert recomputed == per_layer[1] + per_layer[0]
    # same masks -> the very same arithmetic: bit-identical loss and gradients
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


def test_without_rng_preservation_masks_differ(monkeypatch):
    """The control: the seed test above can fail. Without preserve_rng_state the recompute draws new seeds and
    the gradients no longer match the forward's masks."""
    ids, labels = _batch()
    base = _lora_llama()
    ckpt = copy.deepcopy(base)
    enable_gradient_checkpointing(ckpt, ckpt.model.layers, preserve_rng_state=False)
    log = _SeedLog(monkeypatch)
    l0, g0 = _loss_grads(base, ids, labels)
    log.seeds.clear()
    l1, g1 = _loss_grads(ckpt, ids, labels)
    assert log.seeds[14:] != log.seeds[7:14] + log.seeds[:7]
    assert torch.equal(l0, l1)  # the forward itself is unchanged
    assert any(not torch.equal(a, b) for a, b in zip(g0, g1))


def test_checkpointing_with_chunked_ce_matches_plain():
    ids, labels = _batch()
    base = _lora_llama(dropout=0.1)
    ckpt = copy.deepcopy(base)
    enable_gradient_checkpointing(ckpt)
    l0, g0 = _loss_grads(base, ids, labels)
    l1, g1 = _loss_grads(ckpt, ids, labels, chunked=True)
    # oracle: the plain fp64 model (same dropout masks: the seeds come from the same generator state)
    m64 = copy.deepcopy(base).double()
    l64, g64 = _loss_grads(m64, ids, labels)
    assert_close_to_oracle(l1, l64, l0, "loss", atol=4 * torch.finfo(torch.float32).eps * l64.abs().item())
    for i, (a, r, t) in enumerate(zip(g1, g64, g0)):
        assert_close_to_oracle(a, r, t, f"grad[{i}]", atol=4 * torch.finfo(torch.float32).eps * r.abs().max().item())


def test_wrapper_recomputes_and_keeps_module_identity():
    model = _lora_llama(dropout=0.0)
    keys = list(model.state_dict())
    layers = list(model.model.layers)
    calls = []
    orig_forward = type(layers[0].mlp).forward

    def counting(self, x):
        calls.append(1)
        return orig_forward(self, x)

    for layer in layers:
        layer.mlp.forward = counting.__get__(layer.mlp)
    assert checkpoint_modules(layers) == 2
    assert checkpoint_modules(layers) == 0  # idempotent
    assert type(layers[0]).__name__.startswith("Checkpointed")
    assert isinstance(layers[0], type(layers[0]).__mro__[1])
    assert list(model.state_dict()) == keys
    copy.deepcopy(model)  # class swap survives deepcopy
    ids, labels = _batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert len(calls) == 4  # 2 forwards + 2 recomputes
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 2  # no checkpointing without grad
    uncheckpoint_modules(layers)
    assert not type(layers[0]).__name__.startswith("Checkpointed")
    disable_gradient_checkpointing(model)


def test_checkpointing_bad_input():
    with pytest.raises(ValueError, match="layers"):
        enable_gradient_checkpointing(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="modules"):
        checkpoint_modules([3])


def test_cast_frozen_params_bf16_keeps_lora_fp32_and_trains():
    model = _lora_llama(dropout=0.0)
    ref = copy.deepcopy(model)
    rep = cast_frozen_params(model, torch.bfloat16)
    assert rep.bytes_after * 2 == rep.bytes_before and rep.params > 0
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in n else torch.bfloat16), n
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers untouched
    ids, labels = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    for p in opt.param_groups[0]["params"]:
        assert p.grad.dtype == torch.float32
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and opt.state[p]["exp_avg_sq"].dtype == torch.float32
    # accuracy: the bf16-base loss vs the fp64 model is within 2x of an all-bf16 model's error
    l64 = copy.deepcopy(ref).double()(input_ids=ids, labels=labels).loss
    lbf = copy.deepcopy(ref).to(torch.bfloat16)(input_ids=ids, labels=labels).loss
    assert_close_to_oracle(loss.detach(), l64, lbf.detach(), "loss", atol=1e-3)


def test_cast_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        cast_frozen_params(nn.Linear(2, 2), torch.int8)


def test_memory_report_accounts_weights_and_optimizer():
    model = _lora_llama(dropout=0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    t_bytes = sum(p.numel() * 4 for p in trainable)
    all_bytes = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    with PeakMemory() as pm:
        ids, labels = _batch()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    rep = memory_report(model, opt, pm)
    assert rep.trainable_weights == t_bytes and rep.frozen_weights + rep.trainable_weights == all_bytes
    assert rep.grads == t_bytes
    # AdamW: exp_avg + exp_avg_sq (fp32, each the size of the params) + a 0-d 'step' per parameter
    assert 2 * t_bytes <= rep.optimizer_state <= 2 * t_bytes + 8 * len(trainable)
    assert rep.peak >= rep.baseline > 0
    # activations = peak - baseline - known parts: may be 0 in-process (see the fresh-process test below)
    assert rep.activations >= 0 and rep.peak_kind == "cpu peak RSS"
    text = str(rep)
    for word in ("frozen weights", "optimizer state", "activations", "peak"):
        assert word in text
    assert rep.as_dict()["dtypes"] == {"float32": sum(p.numel() for p in model.parameters())}


def test_peak_rss_sees_a_64mib_touch_in_a_fresh_process():
    """RSS peaks are process-wide: after other tests the allocator may serve 64 MiB from memory it already holds
    (no RSS growth), so the measurement is checked in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from lora_kernels.training.memory import PeakMemory\n"
        "with PeakMemory() as pm:\n"
        "    big = torch.ones(64 * 1024 * 1024 // 4)\n"
        "    pm.update()\n"
        "    del big\n"
        "print(pm.peak - pm.baseline)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert int(out.stdout.strip().splitlines()[-1]) >= 60 * 1024 * 1024, out.stdout


def test_activation_estimate_orders():
    cfg = _tiny_llama().config
    plain = estimate_activation_bytes(cfg, 4096)
    ck = estimate_activation_bytes(cfg, 4096, checkpointing=True)
    ce = estimate_activation_bytes(cfg, 4096, chunked_ce=True)
    assert ck["layers"] < plain["layers"] and ce["logits"] < plain["logits"]
    assert plain["total"] == plain["layers"] + plain["logits"]
