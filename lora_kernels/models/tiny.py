"""Tiny random models for tests and smoke runs (built in memory: no files, no network, seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(
    vocab_size: int = 96,
    hidden_size: int = 32,
    intermediate_size: int = 56,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
):
    """A randomly initialised ``LlamaForCausalLM`` (fp32, eval mode): GQA, odd MLP width, ~30k parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 3 specials), built in memory: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>"
    )


def tiny_random(seed: int = 0, hidden: int = 64, layers: int = 2, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a random-init Llama small enough to train for a few steps in a test (~100k
    parameters) with the byte tokenizer (no chat template: the ChatML fallback applies)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,  # not a multiple of hidden: odd shapes for the LoRA kernels
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
        # 0.1, not Llama's 0.02: with 0.02 the tied LM head is so small that logits stay within ~±1 of uniform
        # and a LoRA (which cannot touch the head) barely moves the loss.
        initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    return model, tok


def save_tiny_random(directory, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write :func:`tiny_random` as a Hugging Face model folder (for tests of the local-folder path)."""
    model, tok = tiny_random(seed=seed, hidden=hidden, layers=layers)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return Path(directory)


def tiny_bert(
    num_labels: int, vocab_size: int = 64, hidden: int = 32, layers: int = 2, max_len: int = 64, init_std: float = 0.02
):
    """A randomly initialised small BERT classifier (no dropout, so runs are reproducible step by step)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        pad_token_id=0,
        initializer_range=init_std,
    )
    return BertForSequenceClassification(cfg)
