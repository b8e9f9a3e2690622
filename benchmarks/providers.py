"""Benchmark providers: the same LoRA linear layer computed by different implementations, on shared inputs.

    base    F.linear(x, W) alone: the floor every LoRA implementation is measured against
    peft    PEFT's own LoRA layer (peft.tuners.lora.Linear via get_peft_model on a one-layer model)
    addmm   unfused composition as Unsloth does it: y = x Wᵀ; y.addmm_((x Aᵀ), Bᵀ, alpha=s), differentiated by
            torch autograd (no custom autograd.Function)
    layer   lora_kernels.LoRALinear around the same weights, as a user builds it (backend auto): what the issue-15
            comparison with PEFT's layer measures (module call, dispatch and all)
    torch / triton / cuda
            lora_kernels.lora_linear(..., backend=name); "triton-fused" / "triton-split" select one of the two
            forward plans of the Triton kernel when the Triton module offers set_forward_plan(); on a GPU
            "cuda-simple" / "cuda-pipelined" select the CUDA main loop (LORA_KERNELS_CUDA_KERNEL)

Every provider receives the same tensors (``Inputs``): a frozen base weight, trainable adapters (fp32 by default,
PEFT's default, or the activation dtype), ``x`` that requires grad, and a fixed upstream gradient ``dy``.
A provider that cannot run here is reported with one line saying why (``Skipped``), never dropped silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# LoRA alpha used for every case: scale = alpha / r (2.0 at r=16, the common alpha = 2r setting).
LORA_ALPHA_PER_R = 2.0

ALL_PROVIDERS = ("base", "peft", "addmm", "layer", "torch", "triton", "cuda")


@dataclass(frozen=True)
class Case:
    """One benchmark configuration (everything except the provider and the mode)."""

    M: int
    K: int
    N: int
    r: int
    dtype: str = "fp32"  # activation / base-weight dtype
    adapter_dtype: str = "fp32"  # "fp32" (PEFT's default) or the activation dtype name
    dropout: float = 0.0
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_adapter_dtype(self) -> torch.dtype:
        return DTYPES[self.adapter_dtype]

    @property
    def scale(self) -> float:
        return LORA_ALPHA_PER_R

    def label(self) -> str:
        return f"M={self.M} {self.K}->{self.N} r={self.r} {self.dtype}/{self.adapter_dtype} p={self.dropout:g}"


@dataclass
class Inputs:
    x: torch.Tensor  # [M, K], requires grad
    weight: torch.Tensor  # [N, K], frozen
    lora_A: torch.Tensor  # [r, K], trainable leaf
    lora_B: torch.Tensor  # [N, r], trainable leaf
    dy: torch.Tensor  # [M, N], the upstream gradient
    scale: float


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Random inputs with every term of the same magnitude (never zeros: lora_B is *not* PEFT's zero init).

    x ~ N(0, 1), W ~ N(0, 1/K) (so x Wᵀ ~ N(0, 1)), A ~ N(0, 1/K), B ~ N(0, 1/r) (so XA Bᵀ ~ N(0, 1)): a kernel that
    drops or mis-scales the LoRA term fails the cross-check by O(1), far above rounding.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev, dt, adt = case.device, case.torch_dtype, case.torch_adapter_dtype

    def rnd(*shape, std=1.0, dtype=dt):
        return (torch.randn(*shape, generator=g) * std).to(device=dev, dtype=dtype)

    x = rnd(case.M, case.K).requires_grad_(True)
    weight = rnd(case.N, case.K, std=case.K**-0.5)  # frozen: requires_grad False
    lora_A = rnd(case.r, case.K, std=case.K**-0.5, dtype=adt).requires_grad_(True)
    lora_B = rnd(case.N, case.r, std=case.r**-0.5, dtype=adt).requires_grad_(True)
    dy = rnd(case.M, case.N)
    return Inputs(x, weight, lora_A, lora_B, dy, case.scale)


@dataclass
class Built:
    """A provider ready to run: ``forward(x) -> y`` plus the tensors whose ``.grad`` must be reset between runs."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    own_rng: bool  # dropout from torch's RNG (not lora_kernels' hash): outputs comparable only at p = 0
    has_lora: bool = True
    # Selects this provider's variant in process-wide state (Triton forward plan, CUDA main-loop policy); called
    # before every timed call, so an interleaved or backward-only run never measures another provider's variant.
    activate: Callable[[], None] | None = None
    excluded_storages: set[int] = field(default_factory=set)  # parameter storages (not activation memory)


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


# --------------------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------------------


def _storage_ptrs(*ts) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in ts if t is not None}


def build_base(inp: Inputs, case: Case) -> Built:
    w = inp.weight
    return Built(
        "base", lambda x: F.linear(x, w), [], own_rng=False, has_lora=False, excluded_storages=_storage_ptrs(w)
    )


def build_addmm(inp: Inputs, case: Case) -> Built:
    """Unsloth's unfused LoRA: base GEMM, then ``out.addmm_(X Aᵀ, Bᵀ, alpha=s)``; adapters cast to x's dtype."""
    w, a, b, s, p = inp.weight, inp.lora_A, inp.lora_B, inp.scale, case.dropout

    def forward(x):
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, w)
        xd = F.dropout(x2, p, training=True) if p > 0 else x2
        xa = xd @ a.to(x.dtype).t()
        out.addmm_(xa, b.to(x.dtype).t(), alpha=s)
        return out.view(*x.shape[:-1], w.shape[0])

    return Built("addmm", forward, [a, b], own_rng=True, excluded_storages=_storage_ptrs(w, a, b))


def build_peft(inp: Inputs, case: Case) -> Built:
    """PEFT's own LoRA Linear around an nn.Linear holding the same (frozen) weight, adapters copied in."""
    from peft import LoraConfig, get_peft_model

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(case.K, case.N, bias=False, device="meta")

    model = OneLayer()
    model.proj.weight = torch.nn.Parameter(inp.weight, requires_grad=False)  # shares storage: no copy
    config = LoraConfig(
        r=case.r, lora_alpha=int(round(LORA_ALPHA_PER_R * case.r)), lora_dropout=case.dropout, target_modules=["proj"]
    )
    peft_model = get_peft_model(model, config)  # casts adapters to fp32 by default, like a real fine-tune
    peft_model.train()
    layer = peft_model.base_model.model.proj
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    with torch.no_grad():
        lora_a.to(device=case.device, dtype=case.torch_adapter_dtype)
        lora_b.to(device=case.device, dtype=case.torch_adapter_dtype)
        lora_a.weight.copy_(inp.lora_A)
        lora_b.weight.copy_(inp.lora_B)
    if abs(layer.scaling["default"] - inp.scale) > 1e-12:
        raise RuntimeError(f"peft scaling {layer.scaling['default']} != benchmark scale {inp.scale}")
    params = [lora_a.weight, lora_b.weight]
    return Built("peft", layer, params, own_rng=True, excluded_storages=_storage_ptrs(inp.weight, *params))


def build_layer(inp: Inputs, case: Case) -> Built:
    """``LoRALinear.from_linear`` over an ``nn.Linear`` holding the same (frozen) weight, adapters copied in.

    Its dropout draws a seed per call from torch's generator (like a training run), so its output is compared with
    the reference at p=0 only (``own_rng``); the ``torch`` provider checks the same kernels with the case's p.
    """
    from lora_kernels.nn import LoRALinear

    lin = torch.nn.Linear(case.K, case.N, bias=False, device="meta")
    lin.weight = torch.nn.Parameter(inp.weight, requires_grad=False)  # shares storage: no copy
    layer = LoRALinear.from_linear(
        lin, r=case.r, lora_alpha=LORA_ALPHA_PER_R * case.r, lora_dropout=case.dropout, init_lora_weights=False,
        adapter_dtype=case.torch_adapter_dtype,
    )  # fmt: skip
    with torch.no_grad():
        layer.lora_A.weight.copy_(inp.lora_A)
        layer.lora_B.weight.copy_(inp.lora_B)
    if abs(layer.scaling - inp.scale) > 1e-12:
        raise RuntimeError(f"LoRALinear scaling {layer.scaling} != benchmark scale {inp.scale}")
    layer.train()
    params = [layer.lora_A.weight, layer.lora_B.weight]
    return Built("layer", layer, params, own_rng=True, excluded_storages=_storage_ptrs(inp.weight, *params))


CUDA_POLICY_ENV = (
    "LORA_KERNELS_CUDA_KERNEL"  # read by the extension at every call (lora_kernels/backends/cuda/backend.py)
)


def variant_activator(backend: str, variant: str | None) -> Callable[[], None] | None:
    """The function that selects ``variant`` (a Triton forward plan or a CUDA main-loop policy), or None."""
    if variant is None:
        return None
    if backend == "triton":
        import lora_kernels.backends.triton as lkt

        def activate():
            if lkt.get_forward_plan() != variant:
                lkt.set_forward_plan(variant)

        return activate
    if backend == "cuda":

        def activate():
            if os.environ.get(CUDA_POLICY_ENV) != variant:
                os.environ[CUDA_POLICY_ENV] = variant

        return activate
    raise ValueError(f"backend {backend!r} has no variants")


def build_backend(name: str, backend: str, variant: str | None):
    """``lora_kernels.lora_linear`` with ``backend``; ``variant`` = a Triton forward plan or CUDA kernel policy."""

    def build(inp: Inputs, case: Case) -> Built:
        from lora_kernels import lora_linear

        w, a, b, s, p = inp.weight, inp.lora_A, inp.lora_B, inp.scale, case.dropout
        activate = variant_activator(backend, variant)
        if activate is None:

            def forward(x):
                return lora_linear(x, w, None, a, b, s, p, True, backend=backend)

        else:

            def forward(x):
                activate()
                return lora_linear(x, w, None, a, b, s, p, True, backend=backend)

        return Built(name, forward, [a, b], own_rng=False, excluded_storages=_storage_ptrs(w, a, b), activate=activate)

    return build


# --------------------------------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------------------------------


def _backend_reason(backend: str, case: Case, inp: Inputs) -> str | None:
    """None when ``lora_kernels`` can run ``backend`` on this case, else the registry's reason."""
    from lora_kernels import BackendUnavailableError, LoRAOpts
    from lora_kernels.backends import resolve

    opts = LoRAOpts(scale=inp.scale, dropout_p=case.dropout, seed=0)
    try:
        resolve((inp.x, inp.weight, None, inp.lora_A, inp.lora_B, None, opts), backend)
    except BackendUnavailableError as e:
        return str(e)
    return None


def triton_plans() -> tuple[str, ...]:
    """The forward plans the Triton module exposes (empty when it has no plan switch)."""
    try:
        import lora_kernels.backends.triton as lkt
    except ImportError:
        return ()
    if not (hasattr(lkt, "set_forward_plan") and hasattr(lkt, "get_forward_plan")):
        return ()
    try:
        from lora_kernels.backends.triton.launch import PLANS
    except ImportError:
        return ("fused", "split")
    return tuple(PLANS)


def cuda_policies(case: Case) -> tuple[str, ...]:
    """The CUDA backend's main-loop policies, on a GPU and when the backend reports which loop ran (last_path)."""
    if not case.device.startswith("cuda"):
        return ()
    try:
        import lora_kernels.backends.cuda.backend as lkc
    except ImportError:
        return ()
    return ("simple", "pipelined") if hasattr(lkc, "last_path") else ()


def select(
    names, case: Case, inp: Inputs, *, allow_interpreter: bool = False
) -> tuple[list[tuple[str, Callable]], list[Skipped]]:
    """Resolve provider names to builders for this case; every provider left out comes back as ``Skipped``."""
    chosen: list[tuple[str, Callable]] = []
    skipped: list[Skipped] = []
    for name in names:
        if name == "base":
            chosen.append((name, build_base))
        elif name == "addmm":
            chosen.append((name, build_addmm))
        elif name == "layer":
            chosen.append((name, build_layer))
        elif name == "peft":
            try:
                import peft  # noqa: F401
            except ImportError as e:
                skipped.append(Skipped(name, f"the 'peft' package is not importable ({e})"))
                continue
            chosen.append((name, build_peft))
        elif name in ("torch", "triton", "cuda"):
            why = _backend_reason(name, case, inp)
            if why is not None:
                skipped.append(Skipped(name, why))
                continue
            if name == "triton" and case.device == "cpu":
                if not allow_interpreter:
                    skipped.append(
                        Skipped(
                            name,
                            "on CPU triton runs only under TRITON_INTERPRET (not a benchmark); --allow-interpreter runs it",
                        )
                    )
                    continue
                if os.environ.get("TRITON_INTERPRET") != "1":
                    skipped.append(
                        Skipped(
                            name,
                            "CPU tensors need TRITON_INTERPRET=1 set before lora_kernels.backends.triton is imported",
                        )
                    )
                    continue
            variants = triton_plans() if name == "triton" else cuda_policies(case) if name == "cuda" else ()
            if variants:
                chosen.extend((f"{name}-{v}", build_backend(f"{name}-{v}", name, v)) for v in variants)
            else:
                chosen.append((name, build_backend(name, name, None)))
        else:
            raise ValueError(f"unknown provider {name!r}; known: {', '.join(ALL_PROVIDERS)}")
    return chosen, skipped
