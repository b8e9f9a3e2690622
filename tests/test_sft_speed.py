"""SFT speed defaults (issue 19): the frozen base's dtype and the chunked loss chosen per device and said in the
setup line; packed rows keep every example's attention inside the example (no cross-example leakage)."""

import json

import pytest
import torch

from lora_kernels.models import fused_blocks, save_tiny_random, tiny_random
from lora_kernels.training.sft import runtime
from lora_kernels.training.sft.config import build_config
from lora_kernels.training.sft.data import IGNORE_INDEX, Example, collate, packed_mask_kind
from lora_kernels.training.sft.evaluation import compute_loss_sum
from lora_kernels.training.sft.loop import run_sft

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "flag, over, device, want",
    [
        ("avx512_bf16", {}, CPU, "bf16"),
        ("amx_bf16", {}, CPU, "bf16"),
        (None, {}, CPU, "fp32"),
        (None, {}, CUDA, "bf16"),
        ("avx512_bf16", {"method": "full"}, CPU, "fp32"),
        ("avx512_bf16", {"base_dtype": "fp32"}, CPU, "fp32"),
        (None, {"base_dtype": "bf16"}, CPU, "bf16"),
    ],
)
def test_base_dtype_auto_follows_the_cpu(monkeypatch, flag, over, device, want):
    monkeypatch.setattr(runtime, "cpu_bf16_instructions", lambda: flag)
    cfg = build_config(overrides=over)
    dtype, why = runtime.resolve_base_dtype(cfg, device)
    assert dtype == want
    if "base_dtype" in over:
        assert why == "set by base_dtype"
    elif device.type == "cpu" and cfg.method == "lora":
        assert (flag in why) if flag else ("no avx512_bf16" in why)
    # loaded straight in bf16 only when the base will be bf16 and nothing but LoRA trains
    assert runtime.load_dtype(cfg, device) == (torch.bfloat16 if want == "bf16" else torch.float32)
    cfg_mts = build_config(overrides={**over, "modules_to_save": ["lm_head"]})
    assert runtime.load_dtype(cfg_mts, device) == torch.float32
    if device.type == "cpu" and not over:  # fp32 trainable modules next to a bf16 base need autocast
        assert runtime.resolve_base_dtype(cfg_mts, device)[0] == "fp32"
        cfg_amp = build_config(overrides={"modules_to_save": ["lm_head"], "precision": "bf16"})
        assert runtime.resolve_base_dtype(cfg_amp, device)[0] == want


def test_cpu_flag_detection_reads_proc_cpuinfo():
    flag = runtime.cpu_bf16_instructions()
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    has = [k for k in ("amx_bf16", "avx512_bf16") if k in flags]
    assert flag == (has[0] if has else None) or "AMX" in torch.backends.cpu.get_cpu_capability().upper()


def test_chunked_ce_auto(monkeypatch):
    model, _ = tiny_random(seed=0)
    assert runtime.resolve_chunked_ce(build_config(), CPU, model) == (True, "auto: on on CPU")
    assert runtime.resolve_chunked_ce(build_config(), CUDA, model)[0] is False
    assert runtime.resolve_chunked_ce(build_config(overrides={"chunked_ce": False}), CPU, model)[0] is False
    assert runtime.resolve_chunked_ce(build_config(overrides={"chunked_ce": True}), CUDA, model)[0] is True
    model.config.final_logit_softcapping = 30.0  # a head the chunked loss does not implement: off, and why
    on, why = runtime.resolve_chunked_ce(build_config(), CPU, model)
    assert not on and "final_logit_softcapping" in why


@pytest.mark.parametrize("flag", ["avx512_bf16", None])
def test_default_run_on_cpu(tmp_path, monkeypatch, flag):
    """`lora-kernels sft` at its defaults: bf16 frozen base, fp32 adapters + optimizer state, chunked loss on a CPU
    with bf16 instructions (fp32 base without them), each choice and its reason in the setup line; it learns."""
    monkeypatch.setattr(runtime, "cpu_bf16_instructions", lambda: flag)
    model_dir = save_tiny_random(tmp_path / "model", seed=0, hidden=48, layers=2)
    data = tmp_path / "d.jsonl"
    words = "apple river stone cloud seven orange violet copper".split()
    data.write_text("".join(json.dumps({"prompt": f"Say {w} {v}", "completion": f"{w} {v}."}) + "\n"
                            for w in words for v in words[:4]))  # fmt: skip
    lines = []
    s = run_sft(
        build_config(
            overrides=dict(
                model=str(model_dir),
                dataset=str(data),
                output_dir=str(tmp_path),
                max_len=64,
                batch_size=4,
                max_steps=12,
                eval_size=8,
                eval_every=0,
                save_every=0,
                lr=3e-2,
                warmup_steps=1,
                progress=False,
                plot=False,
                max_new_tokens=0,
                lora_r=4,
                lora_alpha=8.0,
                num_threads=1,
            )
        ),  # fmt: skip
        log=lines.append,
    )
    setup = next(ln for ln in lines if isinstance(ln, str) and ln.startswith("method lora"))
    if flag:
        assert "frozen base bf16 (auto: the CPU has avx512_bf16; --base_dtype overrides)" in setup, setup
    else:
        assert "frozen base fp32 (auto: the CPU has no avx512_bf16 / amx_bf16" in setup, setup
    assert "trainable weights and optimizer state fp32" in setup
    assert "loss chunked CE (auto: on on CPU" in setup, setup
    if fused_blocks.unavailable() is None:  # 2 layers: 2 norms each + the final one, one MLP each
        assert "blocks fused: 5 RMSNorm, 2 MLP (auto: on on CPU; --[no-]fused_blocks overrides)" in setup, setup
    assert s["eval_loss_after"] < s["eval_loss_before"] - 1.0, s


def test_fused_blocks_auto_and_overrides(monkeypatch):
    from lora_kernels.training.sft.config import ConfigError

    if fused_blocks.unavailable() is None:
        assert runtime.resolve_fused_blocks(build_config(), CPU) == (True, "auto: on on CPU")
    on, why = runtime.resolve_fused_blocks(build_config(), CUDA)
    assert not on and why == "auto: off, device cuda (CPU kernels)"
    assert runtime.resolve_fused_blocks(build_config(overrides={"fused_blocks": False}), CPU)[0] is False
    with pytest.raises(ConfigError, match="'fused_blocks': true cannot run here: device cuda"):
        runtime.resolve_fused_blocks(build_config(overrides={"fused_blocks": True}), CUDA)
    monkeypatch.setattr(fused_blocks, "unavailable", lambda: "lora_kernels._cpu not built (test)")
    assert runtime.resolve_fused_blocks(build_config(), CPU) == (False, "auto: off, lora_kernels._cpu not built (test)")


def _packed_logits_and_losses(model, rows, pad_id, kind):
    batch = collate(rows, pad_id, kind)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False)  # fmt: skip
    logits = out.logits.float()
    tok_loss = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch["targets"], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return logits, tok_loss, batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_keeps_attention_inside_each_example(attn, dtype):
    """Changing every token of example 1 in a packed row leaves example 2's logits and token losses bit for bit
    unchanged (it cannot see example 1), while example 1's own outputs change; with a plain causal mask over the
    same packed row example 2's logits do change, so the test can tell leakage apart."""
    model, _ = tiny_random(seed=5)
    model = model.to(dtype)
    model.config._attn_implementation = attn
    kind = packed_mask_kind(model)
    g = torch.Generator().manual_seed(0)

    def ex(n):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        return Example(ids, [IGNORE_INDEX] * 2 + ids[2:])

    ex1, ex2, ex3, other = ex(11), ex(9), ex(6), ex(13)
    ex1b = Example([(t * 7 + 1) % 250 + 3 for t in ex1.input_ids], ex1.labels)  # every token different
    assert all(a != b for a, b in zip(ex1.input_ids, ex1b.input_ids))
    rows_a = [[ex1, ex2, ex3], [other]]  # row 1 packs three examples; row 2 is padded
    rows_b = [[ex1b, ex2, ex3], [other]]
    la, lossa, batch = _packed_logits_and_losses(model, rows_a, 0, kind)
    lb, lossb, _ = _packed_logits_and_losses(model, rows_b, 0, kind)
    s1, s2 = slice(0, 11), slice(11, 20)
    assert torch.equal(la[0, s2], lb[0, s2]) and torch.equal(lossa[0, s2], lossb[0, s2])
    assert torch.equal(la[0, 20:26], lb[0, 20:26])  # the third example too
    assert torch.equal(la[1], lb[1])  # the other row
    assert not torch.allclose(la[0, s1], lb[0, s1])  # example 1 itself did change
    # the packed positions restart per example and the last token of ex1 does not predict ex2's first
    assert batch["position_ids"][0, :20].tolist() == list(range(11)) + list(range(9))
    assert batch["targets"][0, 10] == IGNORE_INDEX
    # a packed row under a plain causal (padding) mask leaks: example 2's logits move with example 1's tokens
    leak = {}
    for rows, out in ((rows_a, "a"), (rows_b, "b")):
        b = collate(rows, 0, kind)
        with torch.no_grad():
            leak[out] = model(input_ids=b["input_ids"], attention_mask=(b["position_ids"] >= 0).long(),
                              use_cache=False).logits[0, s2]  # fmt: skip
    assert not torch.allclose(leak["a"], leak["b"])


def test_packed_loss_through_the_loop_path_ignores_the_neighbour():
    """The loss the loop computes (compute_loss_sum, chunked CE) of a packed row: example 2's share is unchanged
    when example 1's tokens change (bf16 base, as the CPU default trains)."""
    from lora_kernels.training.losses import enable_chunked_loss

    model, _ = tiny_random(seed=6)
    model = enable_chunked_loss(model.to(torch.bfloat16))
    kind = packed_mask_kind(model)
    g = torch.Generator().manual_seed(1)
    ids1, ids2 = torch.randint(3, 250, (10,), generator=g).tolist(), torch.randint(3, 250, (8,), generator=g).tolist()
    ex1 = Example(ids1, [IGNORE_INDEX] * 10)  # no targets in example 1: the whole loss is example 2's
    ex2 = Example(ids2, [IGNORE_INDEX] + ids2[1:])
    ex1b = Example([(t + 5) % 250 + 3 for t in ids1], ex1.labels)
    with torch.no_grad():
        la = compute_loss_sum(model, collate([[ex1, ex2]], 0, kind))
        lb = compute_loss_sum(model, collate([[ex1b, ex2]], 0, kind))
    assert float(la) > 0 and torch.equal(la, lb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tie", [False, True])
def test_lean_folder_load_equals_from_pretrained(tmp_path, dtype, tie):
    """The tensor-at-a-time loader builds the same model as from_pretrained (every tensor, tied weights, buffers,
    attention implementation, logits), and gives its reason instead when the checkpoint does not fit."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lora_kernels.models import byte_tokenizer, load_causal_lm, tiny_llama
    from lora_kernels.models.sources import load_folder_lean

    folder = tmp_path / "m"
    tiny_llama(tie_word_embeddings=tie, seed=2).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    lean = load_folder_lean(folder, dtype)
    ref = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    a, b = lean.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == dtype for k in a)
    assert all(torch.equal(x, y) for x, y in zip(lean.buffers(), ref.buffers()))
    assert (lean.lm_head.weight is lean.model.embed_tokens.weight) == tie
    assert lean.config._attn_implementation == ref.config._attn_implementation and not lean.training
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lean(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)
    # a checkpoint with a name the model does not have: the reason, and load_causal_lm still loads (HF's loader)
    sd = load_file(str(folder / "model.safetensors"))
    save_file({**sd, "extra.weight": torch.zeros(2)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    why = load_folder_lean(folder, dtype)
    assert isinstance(why, str) and "extra.weight" in why
    model, _ = load_causal_lm(str(folder), dtype=dtype)
    assert next(model.parameters()).dtype == dtype


@pytest.mark.parametrize(
    "flag, device, save, want",
    [("avx512_bf16", "cpu", None, "bf16"), (None, "cpu", None, "fp32"), ("avx512_bf16", "cpu", ["lm_head"], "fp32"),
     (None, "cuda", None, "bf16")],
)  # fmt: skip
def test_4bit_base_computes_in_bf16_where_bf16_is_fast(monkeypatch, flag, device, save, want):
    """QLoRA's compute dtype: the unquantized rest of a 4-bit base (and so the activations) in bf16 on a GPU and
    a bf16-capable CPU, fp32 elsewhere and beside fp32 modules_to_save without autocast; the frozen floats follow."""
    monkeypatch.setattr(runtime, "cpu_bf16_instructions", lambda: flag)
    cfg = build_config(overrides={"base_dtype": "nf4", "modules_to_save": save})
    dev = torch.device(device)
    assert runtime.resolve_quant_compute(cfg, dev)[0] == want
    assert runtime.low_precision_base(cfg, dev) == (want == "bf16")
    assert runtime.load_dtype(cfg, dev) == torch.float32  # quantized from full precision
