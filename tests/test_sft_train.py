"""The SFT loop end to end on a tiny random Llama (CPU, fp32): learning, accumulation, exact resume, exports."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_kernels.models import ModelError, save_tiny_random
from lora_kernels.training.sft.checkpoint import CheckpointError, list_checkpoints
from lora_kernels.training.sft.config import ConfigError, build_config
from lora_kernels.training.sft.data import DataError
from lora_kernels.training.sft.loop import run_sft

REPO = Path(__file__).resolve().parents[1]
WORDS = "apple river stone cloud seven orange violet copper maple harbor lantern falcon".split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_random(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden=48, layers=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "echo.jsonl"
    recs = [{"prompt": f"Repeat: {w} {v}", "completion": f"{w} {v}."} for w in WORDS for v in WORDS[:4]]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _overrides(tmp_path, tiny_model, dataset, **kw):
    base = dict(
        model=str(tiny_model),
        dataset=str(dataset),
        output_dir=str(tmp_path),
        name="run",
        max_len=64,
        batch_size=4,
        grad_accum=1,
        max_steps=6,
        eval_size=8,
        eval_every=0,
        eval_batch_size=8,
        save_every=0,
        lr=1e-2,
        warmup_steps=1,
        progress=False,
        plot=False,
        max_new_tokens=4,
        sample_prompts=["Repeat: apple river"],
        lora_r=4,
        lora_alpha=8.0,
        num_threads=1,
        base_dtype="fp32",  # these tests pin fp32 semantics (auto is bf16 on CPUs with bf16 instructions)
    )
    base.update(kw)
    return base


def _run(tmp_path, tiny_model, dataset, **kw):
    return run_sft(build_config(overrides=_overrides(tmp_path, tiny_model, dataset, **kw)), log=lambda *_: None)


def _losses(run_dir):
    recs = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["type"] == "train"]


@pytest.mark.parametrize("method, packing", [("lora", True), ("full", False)])
def test_loss_decreases_and_outputs_exist(tmp_path, tiny_model, dataset, method, packing):
    lr = 3e-2 if method == "lora" else 3e-3
    s = _run(tmp_path, tiny_model, dataset, method=method, packing=packing, max_steps=12, lr=lr, plot=True)
    assert s["eval_loss_after"] < s["eval_loss_before"] - 1.0, s
    losses = [loss for _, loss in _losses(s["run_dir"])]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    run = Path(s["run_dir"])
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png"):
        assert (run / f).is_file(), f
    assert (run / ("adapter" if method == "lora" else "model")).is_dir()
    assert s["tokens_per_s"] > 0 and s["peak_rss_mib"] > 0 and len(s["samples_after"]) == 1
    if method == "lora":
        assert 0 < s["trainable_params"] < s["total_params"] / 2
    else:
        assert s["trainable_params"] == s["total_params"]


def test_grad_accumulation_equals_big_batch(tmp_path, tiny_model, dataset):
    # dropout 0: masks are drawn per micro-batch, so 3 x 2 rows and 6 rows would see different ones
    kw = dict(max_steps=3, eval_size=0, lora_dropout=0.0)
    a = _run(tmp_path, tiny_model, dataset, name="accum", batch_size=2, grad_accum=3, **kw)
    b = _run(tmp_path, tiny_model, dataset, name="big", batch_size=6, grad_accum=1, **kw)
    la, lb = _losses(a["run_dir"]), _losses(b["run_dir"])
    assert [s for s, _ in la] == [1, 2, 3]
    # fp32: only the summation order of the token-loss sum differs (3 partial sums vs 1)
    for (_, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, rel=1e-5)
    from safetensors.torch import load_file

    wa = load_file(str(Path(a["run_dir"]) / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(Path(b["run_dir"]) / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def _cli(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("LORA_KERNELS_SFT_PAUSE_AT_STEP", None)
    env.update(env_extra or {})
    return [sys.executable, "-m", "lora_kernels", "sft", *args], env


def test_kill_and_resume_is_bit_identical(tmp_path, tiny_model, dataset):
    common = [
        "--model", str(tiny_model), "--dataset", str(dataset), "--output_dir", str(tmp_path),
        "--max_len", "64", "--batch_size", "3", "--grad_accum", "2", "--max_steps", "8", "--eval_size", "4",
        "--eval_every", "3", "--save_every", "2", "--keep_last", "2", "--lr", "1e-2", "--warmup_steps", "2",
        "--lora_r", "4", "--lora_dropout", "0.1", "--no-progress", "--no-plot", "--max_new_tokens", "2",
        "--num_threads", "1", "--packing",
    ]  # fmt: skip
    # uninterrupted reference
    cmd, env = _cli([*common, "--name", "ref"])
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    # same run, SIGKILLed while held after step 5 (its last checkpoint is step 4)
    cmd, env = _cli([*common, "--name", "killed"], {"LORA_KERNELS_SFT_PAUSE_AT_STEP": "5"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(ln).get("step") == 5 for ln in metrics.read_text().splitlines()):
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the run never reached step 5")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [s for s, _ in list_checkpoints(tmp_path / "killed" / "checkpoints")] == [2, 4]
    assert not (tmp_path / "killed" / "summary.json").exists()
    # resume from the latest checkpoint and finish
    cmd, env = _cli([*common, "--name", "killed", "--resume"])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    assert "resumed from" in out.stdout and "step-0000004" in out.stdout
    ref, resumed = _losses(tmp_path / "ref"), _losses(tmp_path / "killed")
    assert [s for s, _ in resumed] == list(range(1, 9))
    assert resumed == ref  # bit-identical floats, steps 1-8 (5-8 recomputed after the kill)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sb = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert sa["eval_loss_after"] == sb["eval_loss_after"] and sa["eval_loss_before"] == sb["eval_loss_before"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_gpu_sft_learns_and_resumes(tmp_path, tiny_model, dataset):
    """The loop on a GPU, never run there before session 3's preparation: bf16 base (base_dtype auto), fp32
    adapters, dropout through the Triton kernels (auto's first choice with dropout; the k/v projections, 48 -> 24,
    take the unaligned tiles), checkpointing + chunked CE, deterministic kernels. It must learn as on CPU
    (test_loss_decreases_and_outputs_exist's bound), and a run resumed from its step-4 checkpoint must repeat
    step 5 bit for bit (a forward from the same weights and rows: every op of it is deterministic) and stay on
    the reference's trajectory after it (bf16 rounding, and attention's backward may use atomics on a GPU)."""
    import lora_kernels.backends.triton as lkt

    kw = dict(device="cuda", max_steps=12, lr=3e-2, packing=True, lora_dropout=0.1, save_every=4, keep_last=3,
              deterministic=True, gradient_checkpointing=True, chunked_ce=True, base_dtype="auto")  # fmt: skip
    with lkt.launch_counter() as launches:
        ref = _run(tmp_path, tiny_model, dataset, name="ref", **kw)
    assert launches.count > 0, "the LoRA layers did not run the Triton kernels"
    assert ref["eval_loss_after"] < ref["eval_loss_before"] - 1.0, ref
    step4 = Path(ref["run_dir"]) / "checkpoints" / "step-0000004"
    res = _run(tmp_path, tiny_model, dataset, name="resumed", resume=str(step4), **kw)
    want, got = dict(_losses(ref["run_dir"])), dict(_losses(res["run_dir"]))
    assert sorted(got) == list(range(5, 13)), sorted(got)
    assert got[5] == want[5]
    for step in range(6, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-2), step


def test_peft_reload_and_merged_export_give_equal_logits(tmp_path, tiny_model, dataset):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lora_kernels.adapters.io import load_adapter

    s = _run(tmp_path, tiny_model, dataset, merge=True, max_steps=4, lr=2e-2)
    run = Path(s["run_dir"])
    ids = torch.randint(0, 250, (2, 23), generator=torch.Generator().manual_seed(0))

    def logits(m):
        with torch.no_grad():
            return m.eval()(input_ids=ids).logits

    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model))
    ours_model = AutoModelForCausalLM.from_pretrained(tiny_model)
    load_adapter(ours_model, run / "adapter")
    ours = logits(ours_model)
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter")
    theirs = logits(peft_model)
    merged = logits(AutoModelForCausalLM.from_pretrained(run / "merged"))
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the model, so equality below means something
    # fp32, logits O(1): PEFT computes the same sum in another order; merging rounds W + s·BA once per weight
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, ours, rtol=1e-5, atol=1e-5)
    assert not list((run / "merged").glob("*.bin"))  # safetensors only


def test_bad_inputs_fail_before_training(tmp_path, tiny_model, dataset):
    def no_training(name):
        assert not (tmp_path / name / "metrics.jsonl").exists()

    with pytest.raises(ConfigError, match="nonexistent_proj"):
        _run(tmp_path, tiny_model, dataset, name="t1", target_modules=["nonexistent_proj"])
    no_training("t1")
    with pytest.raises(ModelError, match="neither"):
        _run(tmp_path, tmp_path / "no-model", dataset, name="t2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        _run(tmp_path, tiny_model, empty, name="t3")
    no_training("t3")
    with pytest.raises(DataError, match="not found"):
        _run(tmp_path, tiny_model, tmp_path / "missing.jsonl", name="t4")
    with pytest.raises(ConfigError, match="rows per step"):
        _run(tmp_path, tiny_model, dataset, name="t5", batch_size=64)
    no_training("t5")


def test_corrupt_or_mismatched_checkpoint_is_refused_and_left_untouched(tmp_path, tiny_model, dataset, caplog):
    """A config mismatch is always refused; an explicitly named damaged checkpoint is refused and left as evidence;
    ``--resume latest`` skips a damaged newest checkpoint with a warning naming it and resumes from the previous
    valid one; with no valid checkpoint it is an error listing each failure (issue 18)."""
    _run(tmp_path, tiny_model, dataset, name="c", max_steps=4, save_every=2, keep_last=3)
    ckpts = list_checkpoints(tmp_path / "c" / "checkpoints")
    assert [s for s, _ in ckpts] == [2, 4]
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        _run(tmp_path, tiny_model, dataset, name="c", max_steps=4)
    with pytest.raises(CheckpointError, match=r"different configuration \(lr: checkpoint=0.01 now=0.02"):
        _run(tmp_path, tiny_model, dataset, name="c", max_steps=4, lr=2e-2, resume="latest")
    latest = ckpts[-1][1] / "trainable.safetensors"
    raw = bytearray(latest.read_bytes())
    raw[-3] ^= 0xFF
    latest.write_bytes(bytes(raw))
    before = {p.name: p.read_bytes() for p in ckpts[0][1].iterdir()}
    with pytest.raises(CheckpointError, match="trainable.safetensors does not match its sha256"):
        _run(tmp_path, tiny_model, dataset, name="c", max_steps=4, resume=str(ckpts[-1][1]))
    assert latest.read_bytes() == bytes(raw)  # the evidence is left as is
    assert {p.name: p.read_bytes() for p in ckpts[0][1].iterdir()} == before  # the good one is untouched
    # latest: the damaged step-4 checkpoint is skipped, named in a warning; the run resumes from step 2
    with caplog.at_level("WARNING", logger="lora_kernels"):
        s = _run(tmp_path, tiny_model, dataset, name="c", max_steps=4, resume="latest")
    assert s["resumed_from_step"] == 2
    assert any("skipping a damaged checkpoint" in r.message and ckpts[-1][1].name in r.message for r in caplog.records)
    # no valid checkpoint left: an error that names each failure
    for _, path in list_checkpoints(tmp_path / "c" / "checkpoints"):
        (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"no valid checkpoint(.|\n)*manifest.json is missing"):
        _run(tmp_path, tiny_model, dataset, name="c", max_steps=4, resume="latest")


def test_step_sampler_grouping_by_length():
    """StepSampler with lengths: each epoch still visits every row of its full steps exactly once, the rows of a
    step depend only on (seed, step, rows_per_step) (so resume and k x b accumulation see the same rows), the
    step order is shuffled, and steps pad far less than without grouping."""
    from lora_kernels.training.sft.sampler import StepSampler

    gen = torch.Generator().manual_seed(0)
    n, per_step = 803, 8
    lengths = torch.randint(5, 250, (n,), generator=gen).tolist()

    def padded(sampler, steps):
        real = pad = 0
        for s in range(steps):
            ls = [lengths[i] for i in sampler.rows(s)[1]]
            real, pad = real + sum(ls), pad + max(ls) * len(ls)
        return pad / real

    grouped = StepSampler(n, per_step, seed=3, lengths=lengths)
    plain = StepSampler(n, per_step, seed=3)
    epoch_steps = grouped.steps_per_epoch
    assert epoch_steps == n // per_step == 100
    for epoch in (0, 1):
        seen = [i for s in range(epoch * epoch_steps, (epoch + 1) * epoch_steps) for i in grouped.rows(s)[1]]
        assert len(seen) == len(set(seen)) == epoch_steps * per_step
        assert all(grouped.rows(s)[0] == epoch for s in range(epoch * epoch_steps, (epoch + 1) * epoch_steps))
    # a pure function of (seed, step): a fresh sampler (a resumed run) gives the same rows, in any query order
    again = StepSampler(n, per_step, seed=3, lengths=lengths)
    for s in (150, 7, 99, 100, 0):
        assert again.rows(s) == grouped.rows(s)
    assert StepSampler(n, per_step, seed=4, lengths=lengths).rows(0) != grouped.rows(0)
    # steps are not visited longest-first: the order of steps is shuffled
    firsts = [max(lengths[i] for i in grouped.rows(s)[1]) for s in range(epoch_steps)]
    assert firsts != sorted(firsts, reverse=True) and firsts != sorted(firsts)
    assert padded(grouped, epoch_steps) < 1.2 < 1.5 < padded(plain, epoch_steps)
    with pytest.raises(ValueError, match="lengths"):
        StepSampler(n, per_step, seed=3, lengths=lengths[:-1])
