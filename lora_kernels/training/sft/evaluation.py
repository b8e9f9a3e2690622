"""Loss, evaluation and sample generation. :func:`compute_loss_sum` is the one place logits meet labels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lora_kernels.training import distributed as dist_utils

from .config import SFTConfig
from .data import IGNORE_INDEX, collate
from .runtime import autocast_ctx


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def compute_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's targets (fp32 scalar). The one place logits meet labels."""
    if getattr(dist_utils.unwrap_model(model), "_lk_chunked", None) is not None:
        # chunked CE (lora_kernels.training.losses.enable_chunked_loss): no logits; num_items_in_batch=1 -> the sum
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            shift_labels=batch["targets"],
            num_items_in_batch=1,
        ).loss
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    logits = out.logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        batch["targets"].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _eval_loss_sum(model, core, batch: dict, direct: bool) -> torch.Tensor:
    """The eval loss sum without full-vocabulary logits: through the model when it computes the chunked loss
    itself, straight through the decoder + chunked head when ``direct`` (no FSDP sharding to respect), else the
    training path."""
    if direct and getattr(core, "_lk_chunked", None) is None:
        from lora_kernels.training.losses import aligned_lm_loss_sum

        return aligned_lm_loss_sum(
            core,
            batch["input_ids"],
            batch["targets"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        )
    return compute_loss_sum(model, batch)


@torch.no_grad()
def evaluate(model, rows, cfg: SFTConfig, pad_id: int, device, amp_dtype, *, core=None, direct=False) -> dict:
    """Mean token loss over ``rows``. Rows are batched longest first, so each batch pads to similar lengths (the
    sum over tokens does not depend on the batching); with ``direct`` and ``core`` no logits are materialised."""
    if not rows:
        return {}
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: -sum(len(ex) for ex in rows[i]))
    for i in range(0, len(rows), cfg.eval_batch_size):
        chunk = [rows[j] for j in order[i : i + cfg.eval_batch_size]]
        batch = to_device(collate(chunk, pad_id), device)
        with autocast_ctx(device, amp_dtype):
            total += float(_eval_loss_sum(model, core if core is not None else model, batch, direct))
        count += batch["n_targets"]
    model.train(was_training)
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


@torch.no_grad()
def generate_samples(model, tokenizer, cfg: SFTConfig, device, amp_dtype) -> list[dict]:
    if not cfg.sample_prompts or cfg.max_new_tokens == 0:
        return []
    was_training = model.training
    model.eval()
    out = []
    for prompt in cfg.sample_prompts:
        msgs = [{"role": "user", "content": prompt}]
        if cfg.system_prompt:
            msgs.insert(0, {"role": "system", "content": cfg.system_prompt})
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
        with autocast_ctx(device, amp_dtype):
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        reply = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
        out.append({"prompt": prompt, "reply": reply})
    model.train(was_training)
    return out
