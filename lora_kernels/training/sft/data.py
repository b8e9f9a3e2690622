"""SFT data: conversations in, token rows with assistant-only labels out.

Pipeline (each stage deterministic given the seed)::

    load_conversations  builtin corpus (chatterbot-corpus / chitchat-dataset, read from the installed package's
                        files, no network) or a user JSONL in one of three shapes:
                          {"messages": [{"role": ..., "content": ...}, ...]}
                          {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional)}
                          {"prompt": ..., "completion": ..., "system": ... (optional)}
    split               seeded shuffle (random.Random(seed)); the first ``eval_size`` are held out
    encode_conversation chat template from the tokenizer (a ChatML fallback when it has none), rendered turn by
                        turn so that the text of every assistant turn is known exactly; labels = token ids on
                        assistant turns (content + end-of-turn marker), -100 elsewhere (HF convention: unshifted)
    truncate            to ``max_len`` tokens; truncated examples are counted, examples left with no assistant
                        token are dropped and counted
    pack (optional)     greedy, in shuffled order: examples concatenated into rows of at most ``max_len`` tokens
    collate             rows -> tensors; ``position_ids`` restart at 0 for every example; targets are shifted *per
                        example*, so the last token of one example never predicts the first of the next; packed
                        rows get a 4-D additive block-diagonal causal mask ``[B, 1, T, T]`` (0 = attend,
                        finfo.min = blocked), which transformers' Llama (eager and SDPA, CPU and GPU) takes as is;
                        unpacked rows get the usual 2-D padding mask.
    (sampling)          lora_kernels.training.sft.sampler.StepSampler: the rows of optimizer step s are a pure function of
                        (seed, s), which is what a checkpoint stores for exact resume; optionally grouped by length.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE_INDEX = -100

# ChatML, used only when the tokenizer ships no chat template (a notice is printed when it is installed).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """The dataset is missing, empty or malformed; the message names the file and line."""


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _package_dir(pkg: str, pip_name: str) -> Path:
    """Locate an installed data package without importing it (some import heavy optional dependencies)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in dataset needs the package '{pip_name}': pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_chatterbot(language: str) -> list[list[dict]]:
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / language
    if not root.is_dir():
        raise DataError(f"chatterbot-corpus has no language folder '{language}' (looked in {root})")
    convs, seen = [], set()
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in doc.get("conversations") or []:
            if not isinstance(turns, list) or len(turns) < 2:
                continue
            texts = tuple(str(t).strip() for t in turns)
            if texts in seen or not all(texts):  # the corpus repeats some pairs verbatim
                continue
            seen.add(texts)
            # turns alternate user / assistant; a trailing user turn has no reply and is dropped
            n = len(texts) - len(texts) % 2
            convs.append([{"role": _ROLES[1 + i % 2], "content": texts[i]} for i in range(n)])
    return convs


def _load_chitchat() -> list[list[dict]]:
    path = _package_dir("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    convs = []
    for key in sorted(data):
        groups = [" ".join(u["text"].strip() for u in g).strip() for g in data[key]["messages"]]
        groups = [g for g in groups if g]
        n = len(groups) - len(groups) % 2
        if n >= 2:
            convs.append([{"role": _ROLES[1 + i % 2], "content": groups[i]} for i in range(n)])
    return convs


def _messages_from_record(rec: dict, where: str) -> list[dict]:
    """One JSONL record in any of the three shapes -> a list of {"role", "content"} messages."""
    keys = set(rec)
    if "messages" in keys:
        shape, allowed = "messages", {"messages"}
    elif "instruction" in keys:
        shape, allowed = "instruction", {"instruction", "input", "output", "system"}
    elif "prompt" in keys:
        shape, allowed = "prompt", {"prompt", "completion", "system"}
    else:
        raise DataError(
            f"{where}: unrecognised record with fields {sorted(keys)}; expected one of "
            '{"messages": [...]}, {"instruction", "input", "output"}, {"prompt", "completion"}'
        )
    unknown = sorted(keys - allowed)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown} for a '{shape}' record (allowed: {sorted(allowed)})")

    def text(k, required=True):
        v = rec.get(k)
        if v is None and not required:
            return ""
        if not isinstance(v, str):
            raise DataError(f"{where}: field '{k}' must be a string, got {type(v).__name__}")
        return v

    msgs = []
    if shape == "messages":
        raw = rec["messages"]
        if not isinstance(raw, list):
            raise DataError(f"{where}: 'messages' must be a list")
        for j, m in enumerate(raw):
            if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{j}] must be an object with exactly 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise DataError(f"{where}: messages[{j}] has role {m['role']!r}; allowed: {list(_ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: messages[{j}].content must be a string")
            msgs.append({"role": m["role"], "content": m["content"]})
    else:
        system = text("system", required=False)
        if system:
            msgs.append({"role": "system", "content": system})
        if shape == "instruction":
            user = text("instruction")
            extra = text("input", required=False)
            if extra:
                user = f"{user}\n\n{extra}"
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": text("output")}]
        else:
            msgs += [{"role": "user", "content": text("prompt")}, {"role": "assistant", "content": text("completion")}]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise DataError(f"{where}: example has no assistant turn with content (nothing to train on)")
    first = next((m for m in msgs if m["role"] != "system"), None)
    if first is None or first["role"] != "user":
        raise DataError(f"{where}: the first non-system turn must be 'user'")
    return msgs


def load_jsonl(path: str | Path) -> list[list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    convs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
            convs.append(_messages_from_record(rec, where))
    if not convs:
        raise DataError(f"dataset {path} is empty (no JSON lines)")
    return convs


BUILTIN_DATASETS = ("chatterbot", "chitchat")


def check_dataset_spec(dataset: str) -> None:
    """Cheap early check (before the model loads): a built-in name or an existing file."""
    if dataset in BUILTIN_DATASETS:
        return
    if not Path(dataset).is_file():
        raise DataError(f"dataset {dataset!r}: file not found (and not a built-in: {', '.join(BUILTIN_DATASETS)})")


def load_conversations(dataset: str, language: str = "english") -> list[list[dict]]:
    if dataset == "chatterbot":
        convs = _load_chatterbot(language)
    elif dataset == "chitchat":
        convs = _load_chitchat()
    elif dataset.endswith(".jsonl") or Path(dataset).exists():
        convs = load_jsonl(dataset)
    else:
        raise DataError(
            f"dataset {dataset!r} is neither a built-in ('chatterbot', 'chitchat') nor an existing .jsonl file"
        )
    if not convs:
        raise DataError(f"dataset {dataset!r} has no usable conversations")
    return convs


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation with assistant-only labels
# ---------------------------------------------------------------------------------------------------------------


def ensure_chat_template(tokenizer, log=print) -> None:
    if getattr(tokenizer, "chat_template", None):
        return
    log("note: the tokenizer has no chat template; using the built-in ChatML fallback template")
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels (``-100`` on every token outside an assistant turn).

    The conversation is rendered with the chat template one prefix at a time; the text an assistant turn adds after
    the generation prompt (its content and end-of-turn marker) is its supervised segment. Segments are tokenised
    separately and concatenated, so the boundary between prompt and answer is exact by construction.
    """
    segments: list[tuple[str, bool]] = []  # (text, is_assistant)
    prev = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            gen = _render(tokenizer, messages[:i], add_generation_prompt=True)
            full = _render(tokenizer, messages[: i + 1])
            if not gen.startswith(prev) or not full.startswith(gen):
                raise DataError(
                    "the chat template is not prefix-stable (rendering a longer conversation changes the text of "
                    "earlier turns), so assistant tokens cannot be located; use a template without that behaviour"
                )
            segments += [(gen[len(prev) :], False), (full[len(gen) :], True)]
            prev = full
        else:
            full = _render(tokenizer, messages[: i + 1])
            if not full.startswith(prev):
                raise DataError("the chat template is not prefix-stable; cannot locate assistant tokens")
            segments.append((full[len(prev) :], False))
            prev = full
    ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in segments:
        if not text:
            continue
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += toks
        labels += toks if is_assistant else [IGNORE_INDEX] * len(toks)
    return ids, labels


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    n_conversations: int = 0
    n_train: int = 0
    n_eval: int = 0
    n_truncated: int = 0
    n_dropped_no_target: int = 0
    n_train_rows: int = 0
    train_tokens: int = 0
    train_target_tokens: int = 0
    max_example_len: int = 0
    notes: list[str] = field(default_factory=list)


def tokenize_all(tokenizer, convs, max_len: int, stats: DataStats) -> list[Example]:
    out = []
    for msgs in convs:
        ids, labels = encode_conversation(tokenizer, msgs)
        stats.max_example_len = max(stats.max_example_len, len(ids))
        if len(ids) > max_len:
            stats.n_truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        # a label at position 0 is never a target (nothing predicts it), so count from position 1
        if not any(lab != IGNORE_INDEX for lab in labels[1:]):
            stats.n_dropped_no_target += 1
            continue
        out.append(Example(ids, labels))
    return out


def pack_examples(examples: list[Example], max_len: int) -> list[list[Example]]:
    """Greedy packing in the given order: start a new row when the next example does not fit."""
    rows, cur, used = [], [], 0
    for ex in examples:
        if cur and used + len(ex) > max_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(ex)
        used += len(ex)
    if cur:
        rows.append(cur)
    return rows


@dataclass
class SFTData:
    train_rows: list[list[Example]]
    eval_rows: list[list[Example]]
    stats: DataStats


def prepare_data(cfg, tokenizer, log=print) -> SFTData:
    """Load, split, tokenise, truncate and (optionally) pack, as the config says. Raises DataError early."""
    convs = load_conversations(cfg.dataset, cfg.dataset_language)
    if cfg.system_prompt:
        convs = [
            c if c[0]["role"] == "system" else [{"role": "system", "content": cfg.system_prompt}, *c] for c in convs
        ]
    stats = DataStats(n_conversations=len(convs))
    order = list(range(len(convs)))
    random.Random(cfg.seed).shuffle(order)
    convs = [convs[i] for i in order]
    if cfg.eval_size >= len(convs):
        raise DataError(
            f"eval_size={cfg.eval_size} leaves no training data: the dataset has {len(convs)} conversations"
        )
    eval_convs, train_convs = convs[: cfg.eval_size], convs[cfg.eval_size :]
    if cfg.max_examples is not None:
        train_convs = train_convs[: cfg.max_examples]
    ensure_chat_template(tokenizer, log)
    train = tokenize_all(tokenizer, train_convs, cfg.max_len, stats)
    eval_ = tokenize_all(tokenizer, eval_convs, cfg.max_len, stats)
    if not train:
        raise DataError(f"no training example has an assistant token within max_len={cfg.max_len}")
    stats.n_train, stats.n_eval = len(train), len(eval_)
    stats.train_tokens = sum(len(e) for e in train)
    stats.train_target_tokens = sum(sum(1 for lab in e.labels[1:] if lab != IGNORE_INDEX) for e in train)
    train_rows = pack_examples(train, cfg.max_len) if cfg.packing else [[e] for e in train]
    eval_rows = [[e] for e in eval_]  # eval never packs: its loss is the reference for packed and unpacked runs
    stats.n_train_rows = len(train_rows)
    return SFTData(train_rows, eval_rows, stats)


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------


def collate(rows: list[list[Example]], pad_id: int, mask_kind: str = "additive") -> dict:
    """Rows of examples -> ``input_ids, position_ids, attention_mask, targets`` (targets already shifted).

    ``targets[b, t]`` is the label the logits at position ``t`` are scored against: ``labels[t + 1]`` of the same
    example, ``-100`` at each example's last token and on padding.

    Packed rows get a 4-D ``[B, 1, T, T]`` mask in the form the model's attention takes as is: ``"bool"``
    (True = attend; transformers' SDPA path, any activation dtype) or ``"additive"`` (fp32, 0 / finfo.min; the
    eager path, which adds it to the scores). See :func:`packed_mask_kind`.
    """
    if mask_kind not in ("bool", "additive"):
        raise ValueError(f"mask_kind must be 'bool' or 'additive', got {mask_kind!r}")
    width = max(sum(len(e) for e in row) for row in rows)
    bsz = len(rows)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((bsz, width), dtype=torch.long)
    targets = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
    segment = torch.full((bsz, width), -1, dtype=torch.long)  # -1 = padding
    packed = any(len(row) > 1 for row in rows)
    for b, row in enumerate(rows):
        t = 0
        for s, ex in enumerate(row):
            n = len(ex)
            input_ids[b, t : t + n] = torch.tensor(ex.input_ids)
            position_ids[b, t : t + n] = torch.arange(n)
            targets[b, t : t + n - 1] = torch.tensor(ex.labels[1:])
            segment[b, t : t + n] = s
            t += n
    batch = {"input_ids": input_ids, "position_ids": position_ids, "targets": targets}
    if packed:
        # block-diagonal causal: query q sees key k iff same example and k <= q (padding only sees padding)
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = same & causal
        if mask_kind == "bool":
            batch["attention_mask"] = allowed[:, None]
        else:
            mask = torch.zeros((bsz, 1, width, width), dtype=torch.float32)
            mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
            batch["attention_mask"] = mask
    else:
        batch["attention_mask"] = (segment >= 0).long()
    batch["n_targets"] = int((targets != IGNORE_INDEX).sum())
    return batch


def packed_mask_kind(model) -> str:
    """Which 4-D mask form the model's attention implementation consumes unchanged (packing needs one)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return "bool"
    if impl == "eager":
        return "additive"
    raise DataError(
        f"packing needs a 4-D attention mask, which attn_implementation={impl!r} does not take; "
        "load the model with attn_implementation='sdpa' or 'eager', or set packing: false"
    )
