"""Chunked linear cross-entropy: the LM-head projection and the loss, a chunk of tokens at a time.

A causal LM's loss is ``CE(h Wᵀ + b, y)`` with ``h: [T, H]`` the final hidden states, ``W: [V, H]`` the LM head and
``y: [T]`` the labels (``ignore_index`` = skip). Materialising ``Z = h Wᵀ`` in fp32 costs ``4·T·V`` bytes, and
autograd keeps more than one such tensor alive (the logits in the activation dtype, their fp32 upcast, the
softmax of the backward): for SmolLM2 (V = 49152) and T = 8192 tokens that is 1.6 GB per copy, more than the
model. Here the ``[T, V]`` tensor never exists; only one ``[C, V]`` chunk does.

Math, per chunk ``c`` of ``C`` rows (``Z_c = h_c Wᵀ + b`` upcast to fp32, ``v_t = [y_t != ignore_index]``,
``D`` = the divisor: the number of non-ignored tokens for ``mean``, 1 for ``sum``, or ``num_items_in_batch``)::

    lse_t  = logsumexp(Z_c[t, :])                       fp32
    loss  += Σ_t v_t · (lse_t - Z_c[t, y_t]) / D
    G_c    = (softmax(Z_c) - onehot(y_c)) · v / D       [C, V] = dloss/dZ_c   (fp32, cast to h's dtype)
    dh_c   = G_c W                                      [C, H]
    dW    += G_cᵀ h_c     db += Σ_t G_c[t]              fp32 accumulators, only when W / b require grad

The backward of the whole op is then ``grad_output · (dh, dW, db)``: a scalar times tensors.

Only rows with ``v_t = 1`` enter the loop: an ignored row has no loss and a zero gradient, so its logits are
never computed (in SFT the prompt tokens are ignored: with chatterbot rows about 60% of them, and the head is
about a fifth of a small model's FLOPs); its ``dh`` row is zero.

Two ways to place the gradient work (``grad_mode``):

- ``"forward"`` (default): the loop above runs in the forward and keeps ``dh`` (same size as ``h``, which it
  replaces as the saved tensor) plus ``dW`` when the head is trainable. One head GEMM per chunk forward, two
  backward: 3 GEMMs in total, the same as unchunked autograd.
- ``"recompute"``: the forward only computes the loss; the backward redoes ``Z_c``. 4 GEMMs (one extra head
  projection), saves ``h`` only; useful when the head is trainable and the ``[V, H]`` fp32 ``dW`` must not be
  held from the forward to the backward. Measured on 2 CPU cores (T = 2048, H = 576, V = 49152, 256-row chunks,
  loss + backward): forward 1.07 s, recompute 1.8 s, unchunked ``F.cross_entropy`` 2.0 s.

Precision follows Hugging Face's ``ForCausalLMLoss``: the head GEMM runs in the activation dtype, the logits
are upcast to fp32 before the softmax, and the logit gradient is cast back to the activation dtype for the two
backward GEMMs (what autograd does through ``logits.float()``), so in fp32 the result equals
``F.cross_entropy(F.linear(h, W, b), y)`` up to summation order.

Semantics: ``reduction="mean"`` divides by the number of non-ignored tokens and returns **0 (not NaN) when every
token is ignored** (``F.cross_entropy`` returns NaN there); ``"sum"`` sums; ``num_items_in_batch`` overrides the
divisor (gradient accumulation and data parallelism divide by the token count of the *global* batch).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

_GRAD_MODES = ("forward", "recompute")
_REDUCTIONS = ("mean", "sum")


def auto_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk so that one fp32 ``[C, V]`` logits chunk is about the size of ``h`` (``T x H``).

    Same rule as Liger-Kernel's fused linear CE: ``C = T / ceil(V / H)`` rounded up to a power of two, and at
    least 256 rows: thinner head GEMMs ``C x H x V`` starve BLAS (2 CPU cores, T=2048, H=576, V=49152, loss +
    backward: 64 rows 2.4 s, 128 rows 2.2 s, 256 rows 1.07 s, 512 rows 1.0 s; unchunked F.cross_entropy 2.0 s).
    A 256-row fp32 chunk of a 128k vocabulary is 128 MiB.
    """
    n_chunks = max(1, math.ceil(vocab_size / max(hidden_size, 1)))
    c = max(1, math.ceil(num_tokens / n_chunks))
    return max(256, 1 << (c - 1).bit_length())


def _chunk_grad(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, w_row: torch.Tensor) -> torch.Tensor:
    """In place on the fp32 logits ``z``: ``(softmax(z) - onehot(y)) * w_row[:, None]``; ``y`` already clamped."""
    z.sub_(lse.unsqueeze(1)).exp_()
    z[torch.arange(z.shape[0], device=z.device), y] -= 1.0
    return z.mul_(w_row.unsqueeze(1))


def _chunks(t: int, c: int):
    for s in range(0, t, c):
        yield s, min(s + c, t)


def _forward_loss_and_grads(h, w, b, y, ignore_index, scale, chunk, need_dh, need_dw, need_db):
    """The chunk loop. Returns ``(loss, dh | None, dW | None, db | None)``; loss, dW and db in ``acc`` precision.

    ``acc`` is fp32 (fp64 for fp64 inputs, the gradcheck / oracle case). ``scale`` is ``1 / D`` as a 0-d tensor
    (no host sync), applied per row together with the ignore mask.
    """
    t = h.shape[0]
    acc = torch.promote_types(h.dtype, torch.float32)
    loss = torch.zeros((), dtype=acc, device=h.device)
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_dw else None
    db = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_db else None
    for s, e in _chunks(t, chunk):
        hc, yc = h[s:e], y[s:e]
        z = (torch.addmm(b, hc, w.t()) if b is not None else hc @ w.t()).to(acc)  # [c, V] logits
        valid = yc != ignore_index
        yc0 = torch.where(valid, yc, 0)
        lse = torch.logsumexp(z, dim=1)
        tgt = z.gather(1, yc0.unsqueeze(1)).squeeze(1)
        row_w = valid.to(acc) * scale
        loss += ((lse - tgt) * row_w).sum()
        if need_dh or need_dw or need_db:
            g = _chunk_grad(z, lse, yc0, row_w)  # [c, V] dloss/dZ, in z's memory
            if need_db:
                db += g.sum(0)
            g = g.to(h.dtype)  # what autograd feeds the head GEMMs through `logits.float()`
            if need_dh:
                torch.mm(g, w, out=dh[s:e])
            if need_dw:
                # low precision: one GEMM per chunk in h's dtype (fp32 accumulation inside BLAS), summed in fp32
                dw += g.t() @ hc if dw.dtype == h.dtype else (g.t() @ hc).to(acc)
    return loss, dh, dw, db


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, y, scale, ignore_index: int, chunk: int, grad_mode: str, need: tuple):
        ctx.grad_mode = grad_mode
        ctx.meta = (ignore_index, chunk, need, w.dtype, None if b is None else b.dtype)
        if grad_mode == "forward":
            loss, dh, dw, db = _forward_loss_and_grads(h, w, b, y, ignore_index, scale, chunk, *need)
            ctx.save_for_backward(dh, dw, db)
        else:
            loss, _, _, _ = _forward_loss_and_grads(h, w, b, y, ignore_index, scale, chunk, False, False, False)
            ctx.save_for_backward(h, w, b, y, scale)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        ignore_index, chunk, need, w_dtype, b_dtype = ctx.meta
        if ctx.grad_mode == "forward":
            dh, dw, db = ctx.saved_tensors
        else:
            h, w, b, y, scale = ctx.saved_tensors
            _, dh, dw, db = _forward_loss_and_grads(h, w, b, y, ignore_index, scale, chunk, *need)
        # The op is linear in grad_loss (a scalar): scale the stored gradients, cast dW / db once.
        dh = dh * grad_loss.to(dh.dtype) if dh is not None else None
        dw = (dw * grad_loss.to(dw.dtype)).to(w_dtype) if dw is not None else None
        db = (db * grad_loss.to(db.dtype)).to(b_dtype) if db is not None else None
        return dh, dw, db, None, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    grad_mode: str = "forward",
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)`` without materialising the logits.

    Args:
        hidden: ``[..., H]`` final hidden states (fp32 / bf16 / fp16 / fp64).
        weight: ``[V, H]`` LM head (same dtype as ``hidden``); trainable or frozen.
        labels: integer ``[...]`` with the leading shape of ``hidden``; ``ignore_index`` entries are skipped.
            Labels are *not* shifted here (see :func:`causal_lm_loss`).
        bias: optional ``[V]``.
        reduction: ``"mean"`` over non-ignored tokens (0 when there are none) or ``"sum"``.
        num_items_in_batch: divisor replacing the count of non-ignored tokens (``reduction="mean"`` only):
            the global token count under gradient accumulation / data parallelism, as in HF's loss functions.
        chunk_size: tokens per chunk; ``None`` picks :func:`auto_chunk_size`.
        grad_mode: ``"forward"`` (gradients computed in the forward chunk loop) or ``"recompute"``.

    Returns a 0-d fp32 tensor (fp64 for fp64 inputs).
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise TypeError(f"hidden must be a floating tensor [..., hidden_size], got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [vocab, hidden_size] tensor, got {getattr(weight, 'shape', weight)}")
    v, hs = weight.shape
    if hidden.shape[-1] != hs:
        raise ValueError(f"hidden.shape[-1] ({hidden.shape[-1]}) must equal weight.shape[1] ({hs})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device ({hidden.device}), got {weight.device}")
    if bias is not None and (bias.shape != (v,) or bias.dtype != hidden.dtype or bias.device != hidden.device):
        raise ValueError(f"bias must be [{v}] with hidden's dtype and device, got {tuple(bias.shape)} {bias.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if labels.device != hidden.device:
        raise ValueError(f"labels must be on hidden's device ({hidden.device}), got {labels.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if grad_mode not in _GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {_GRAD_MODES}, got {grad_mode!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch is only meaningful with reduction='mean'")

    h = hidden.reshape(-1, hs)
    y = labels.reshape(-1).to(torch.int64)
    t = h.shape[0]
    valid = y != ignore_index
    bad = valid & ((y < 0) | (y >= v))
    # one host sync per call (F.cross_entropy would raise on CPU, assert on CUDA, on a bad label)
    n_bad, n_valid = torch.stack((bad.sum(), valid.sum())).tolist() if t else (0, 0)
    if n_bad:
        raise ValueError(f"labels must be in [0, {v}) or ignore_index={ignore_index}; got {y[bad][:4].tolist()}")
    if n_valid < t:
        # An ignored row adds neither loss nor gradient, so only labelled rows go through the head: its GEMMs and
        # the [rows, V] softmax shrink to the labelled share (in SFT the prompt rows are ignored).
        # index_select's backward scatters dh back into zeros for the ignored rows.
        keep = valid.nonzero().squeeze(1)
        h, y = h.index_select(0, keep), y.index_select(0, keep)
        t = n_valid

    if reduction == "sum":
        scale = torch.ones((), dtype=torch.float32, device=h.device)
    elif num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=h.device)
        if n.dim() != 0:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(n.shape)}")
        scale = 1.0 / n.clamp(min=1.0)
    else:
        # All tokens ignored -> divisor 1 and no row left: loss 0, gradients 0, no NaN.
        scale = torch.tensor(1.0 / max(n_valid, 1), dtype=torch.float32, device=h.device)
    if h.dtype == torch.float64:
        scale = scale.double()

    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if t == 0:  # no row left: a zero loss still wired to every input that wants a gradient (zeros, not None)
        zero = sum((x.sum() * 0 for x, on in zip((h, weight, bias), need) if on), h.sum() * 0)
        return zero.to(torch.promote_types(h.dtype, torch.float32))
    chunk = chunk_size or auto_chunk_size(t, hs, v)
    if not any(need):
        with torch.no_grad():
            loss, _, _, _ = _forward_loss_and_grads(h, weight, bias, y, ignore_index, scale, chunk, False, False, False)
        return loss
    return _ChunkedLinearCE.apply(h, weight, bias, y, scale, ignore_index, chunk, grad_mode, need)


def reference_linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean"):
    """The unchunked composition (what HF's ``ForCausalLMLoss`` computes), for tests and benchmarks."""
    z = F.linear(hidden, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # HF's logits.float(), keeping fp64 for oracles
    return F.cross_entropy(
        z.reshape(-1, weight.shape[0]), labels.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )


def _check_plain_head(model: torch.nn.Module) -> None:
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if cfg is not None and getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"chunked loss: model config sets {attr}={getattr(cfg, attr)!r}, not supported")
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"model {type(model).__name__} is not a Hugging Face *ForCausalLM (no decoder / output head)")
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model {type(model).__name__} has no linear output head")


def chunked_loss_unsupported(model: torch.nn.Module) -> str | None:
    """Why :func:`enable_chunked_loss` cannot take ``model`` (a sentence), or None when it can."""
    try:
        _check_plain_head(model)
    except (ValueError, NotImplementedError) as e:
        return str(e)
    return None


def _decoder_hidden(model, input_ids, attention_mask, position_ids, **kwargs) -> torch.Tensor:
    out = model.get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        return_dict=True,
        **kwargs,
    )
    return out.last_hidden_state


def _shifted_head_loss(model, hidden, labels, num_items_in_batch, chunk_size, grad_mode, ignore_index):
    head = model.get_output_embeddings()
    # Shift exactly like HF: pad the labels by one ignored position and drop the first, so hidden row t
    # predicts token t+1 and hidden stays a contiguous view (no [T, H] copy).
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return chunked_linear_cross_entropy(
        hidden,
        head.weight,
        shifted,
        getattr(head, "bias", None),
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
        grad_mode=grad_mode,
    )


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    grad_mode: str = "forward",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token loss of a Hugging Face ``*ForCausalLM`` with the chunked head: same value as
    ``model(input_ids, labels=labels).loss`` (labels shifted inside, as HF does) without the logits.

    Calls the decoder directly, so it bypasses wrappers (DDP, FSDP2 root hooks): under those use
    :func:`enable_chunked_loss`, which routes ``model(..., labels=...)`` here instead.
    """
    _check_plain_head(model)
    hidden = _decoder_hidden(model, input_ids, attention_mask, position_ids)
    return _shifted_head_loss(model, hidden, labels, num_items_in_batch, chunk_size, grad_mode, ignore_index)


def aligned_lm_loss_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sum of the token cross-entropies of a Hugging Face ``*ForCausalLM`` against ``targets`` already aligned
    with the positions (``targets[b, t]`` is the label of position t's logits), through the chunked head: no
    ``[tokens, vocab]`` logits. Calls the decoder directly (no wrapper hooks): for evaluation and plain models."""
    _check_plain_head(model)
    hidden = _decoder_hidden(model, input_ids, attention_mask, position_ids)
    head = model.get_output_embeddings()
    return chunked_linear_cross_entropy(
        hidden,
        head.weight,
        targets,
        getattr(head, "bias", None),
        ignore_index=ignore_index,
        reduction="sum",
        chunk_size=chunk_size,
    )


_CHUNKED_CLASSES: dict[type, type] = {}


def enable_chunked_loss(model: torch.nn.Module, chunk_size: int | None = None, grad_mode: str = "forward"):
    """Make ``model(input_ids, labels=..., num_items_in_batch=...)`` compute the chunked loss and return
    ``logits=None``; calls without ``labels`` (generation, logits for evaluation) are unchanged.

    ``shift_labels=`` (HF's keyword for targets already aligned with the positions) is used as is, without the
    shift; ``num_items_in_batch=1`` turns the mean into the sum (what a loop that normalises itself wants).

    Done by swapping ``model.__class__`` for a subclass (state_dict, ``isinstance`` and ``save_pretrained`` are
    unaffected), so the loss runs inside ``model.__call__``: DDP's and FSDP2's forward hooks see it.
    Returns ``model``. :func:`disable_chunked_loss` undoes it.
    """
    _check_plain_head(model)
    if grad_mode not in _GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {_GRAD_MODES}, got {grad_mode!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    cls = getattr(type(model), "_lk_chunked_base", type(model))
    if cls not in _CHUNKED_CLASSES:

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
            shift_labels = kwargs.pop("shift_labels", None)
            if labels is None and shift_labels is None:
                return cls.forward(
                    self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
                )
            from transformers.modeling_outputs import CausalLMOutputWithPast

            n_items = kwargs.pop("num_items_in_batch", None)
            for k in ("use_cache", "return_dict", "logits_to_keep", "output_attentions", "output_hidden_states"):
                kwargs.pop(k, None)
            hidden = _decoder_hidden(self, input_ids, attention_mask, position_ids, **kwargs)
            cs, gm = self._lk_chunked
            if shift_labels is not None:  # HF's name for targets already aligned with the hidden rows
                head = self.get_output_embeddings()
                loss = chunked_linear_cross_entropy(
                    hidden,
                    head.weight,
                    shift_labels,
                    getattr(head, "bias", None),
                    num_items_in_batch=n_items,
                    chunk_size=cs,
                    grad_mode=gm,
                )
            else:
                loss = _shifted_head_loss(self, hidden, labels, n_items, cs, gm, -100)
            return CausalLMOutputWithPast(loss=loss, logits=None)

        # generate() inspects forward's signature to decide which kwargs to pass: show it the original one
        functools.update_wrapper(forward, cls.forward)
        _CHUNKED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "_lk_chunked_base": cls})
    model.__class__ = _CHUNKED_CLASSES[cls]
    model._lk_chunked = (chunk_size, grad_mode)
    return model


def disable_chunked_loss(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(type(model), "_lk_chunked_base", None)
    if base is not None:
        model.__class__ = base
    return model
