"""The subspace method (LoRA-XS style): train an ``r x r`` matrix between the frozen top-r singular vectors of ``W``.

For each targeted ``nn.Linear`` with ``W = U S Vᵀ`` (``W: [out, in]``)::

    W' = W + s · U_r R V_rᵀ          U_r: [out, r], V_r: [in, r] frozen;  R: [r, r] trainable, R = 0 at start
    y  = x Wᵀ + b + s · ((x ⊙ Z) V_r) Rᵀ U_rᵀ

which is the fused LoRA op with ``A = V_rᵀ`` (``lora_A.weight``), ``B = U_r`` (``lora_B.weight``) and the optional
middle matrix ``lora_R`` of :func:`lora_kernels.functional.lora_linear`: the ``[M, r]`` intermediate ``XA`` is
multiplied by ``Rᵀ`` (``r²`` per row: negligible) before ``B``; no new kernel. The gradient reaching ``R`` is
``dR = s · (G B)ᵀ (X A)``, ``[r, M] · [M, r]`` (DESIGN.md's ``GB`` and ``XA``, both already computed for LoRA).

``s = lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``), as LoRA. Trainable parameters per layer: ``r²`` instead of
LoRA's ``r (in + out)``; e.g. r = 32 on a 384 x 1536 layer: 1,024 vs 61,440.

Bases: computed **once**, at injection (``torch.linalg.svd`` of the weight in fp32, fp64 for an fp64 weight), stored
in the frozen ``lora_A`` / ``lora_B`` of :class:`SubspaceLinear` and never recomputed (not per forward, not to
merge). Signs are made canonical (the largest-magnitude entry of each ``U_r`` column is positive) so that a
recomputation on the same weights gives the same frame. The top-r singular values are kept in the buffer
``svd_sigma`` (fingerprint of the base weight).

Difference from LoRA-XS (Bałazy et al. 2024): LoRA-XS folds ``S_r`` into one factor; here the frame is orthonormal
(``U_r``, ``V_r``), as the issue specifies, so ``‖ΔW‖_F = s · ‖R‖_F`` and one learning rate fits every layer.

Injection and the adapter file format: :mod:`lora_kernels.adapters.subspace`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quant import nf4 as _nf4
from .core import AdapterLinear

PROBE_SEED = 20240521  # fixed: the probe vectors must be the same at save and at load


def svd_top(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical-sign top-r ``(U_r [out, r], S_r [r], V_rᵀ [r, in])`` of ``weight`` in fp32 (fp64 for fp64)."""
    weight = _nf4.dequantize(weight) if _nf4.is_params4bit(weight) else weight  # a 4-bit base: SVD of its values
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(weight.detach().to(dt), full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    # sign of the largest-|.| entry of each U column; flip (u_i, v_i) together so U S Vᵀ is unchanged
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u.gather(0, idx[None, :])).squeeze(0)
    sign[sign == 0] = 1
    return u * sign[None, :], s, vh * sign[:, None]


def probe_vectors(out_features: int, in_features: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(PROBE_SEED)
    h_out = torch.randn(out_features, generator=g, dtype=torch.float64) / math.sqrt(out_features)
    h_in = torch.randn(in_features, generator=g, dtype=torch.float64) / math.sqrt(in_features)
    return h_out.to(device), h_in.to(device)


class SubspaceLinear(AdapterLinear):
    """An adapter layer whose ``lora_A = V_rᵀ`` and ``lora_B = U_r`` are frozen singular vectors of the base weight,
    with a trainable ``lora_R`` (``[r, r]``, zero at init, so the layer starts equal to the base layer).

    Built with :meth:`from_linear` (shares the base Parameters). ``merge()``, ``unmerge()``, ``to_linear()`` and
    ``delta_weight() = s · U_r R V_rᵀ`` come from the adapter core, which includes ``lora_R``.
    """

    KIND = "subspace"  # how messages name this adapter
    DEFAULT_INIT = "svd"

    @classmethod
    def check_init(cls, init_lora_weights):
        if init_lora_weights != "svd":
            raise ValueError(f"init_lora_weights must be 'svd' for SubspaceLinear, got {init_lora_weights!r}")
        return init_lora_weights

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights="svd") -> None:
        """(Re)compute the frozen bases from the current base weight and set ``R = 0``."""
        if getattr(self, "merged", False):
            raise ValueError("cannot recompute the subspace bases of a merged layer; unmerge() first")
        u, s, vh = svd_top(self.weight, self.r)
        self.lora_A.weight.copy_(vh)
        self.lora_B.weight.copy_(u)
        self.lora_A.weight.requires_grad_(False)
        self.lora_B.weight.requires_grad_(False)
        self.register_buffer("svd_sigma", s.float(), persistent=False)
        self.lora_R = nn.Parameter(
            torch.zeros(self.r, self.r, device=self.weight.device, dtype=self.lora_A.weight.dtype)
        )

    @torch.no_grad()
    def frame_probe(self) -> torch.Tensor:
        """``[2, r]``: ``U_rᵀ h_out`` and ``V_rᵀ h_in`` for fixed Gaussian vectors; detects a flipped/rotated frame."""
        h_out, h_in = probe_vectors(self.out_features, self.in_features, self.weight.device)
        u = self.lora_B.weight.double()
        vh = self.lora_A.weight.double()
        return torch.stack([u.t() @ h_out, vh @ h_in]).float()

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", r=", ", subspace r=", 1)
