"""What the benchmarks compare: the bf16 reference, every qkernels backend from the registry, and
the peers (torchao, bitsandbytes, diffusers layerwise casting) when installed.

A :class:`Variant` quantizes the selected ``nn.Linear`` layers of a module tree in place,
one layer at a time (the replaced bf16 weight is freed before the next layer is quantized, so
peak memory is the result plus one layer). A variant that cannot run here still appears, with
``status`` saying why ("not installed", "unavailable: ..."), so no peer is silently dropped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

import qkernels
from qkernels import QuantLinear, list_backends

__all__ = ["Variant", "Unavailable", "all_variants", "swap_linears", "Select"]

Select = Callable[[str, nn.Linear], bool]  # (qualified name, layer) -> quantize it?


class Unavailable(Exception):
    """A variant that cannot be applied here; str(exc) is the status to report."""


# Which peak a format's GEMM is measured against.
PEAK_KIND = {"none": "bf16", "w8a8-int8": "int8", "w8a8-fp8": "fp8", "w8-int8": "bf16", "w8-fp8": "bf16"}


@dataclass
class Variant:
    name: str  # e.g. "int8-torch", "torchao-int8-dynamic+compile"
    family: str  # bf16 | qkernels | torchao | bitsandbytes | diffusers
    format: str  # a qkernels format name, or "none"
    status: str = "ok"  # "ok", "not installed", "unavailable: <reason>"
    compiled: bool = False
    note: str = ""  # what a reader must know to read its numbers
    fuse: bool = False  # qkernels: the fused block path (qpipeline.blocks) after quantizing
    graphs: bool = False  # CUDA-graph replay of the block loop (qpipeline.graphs)
    attention: str | None = None  # qkernels.attention mode for the model's joint attention (set before fusing)
    tma_min_m: int | None = -1  # fp8-triton: FP8Triton.TMA_MIN_M while this variant runs (-1: the default)
    replay: bool = True  # Triton backends: replay each layer's recorded launches (False: every call's Python)
    # In-place quantization of the selected Linears of a module tree (None for bf16).
    quantize: Callable[[nn.Module, Select], None] | None = field(default=None, repr=False)
    # Whole-model application that replaces ``quantize`` for transformers (diffusers' own
    # enable_layerwise_casting picks its layers itself).
    quantize_model: Callable[[nn.Module], None] | None = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return self.status == "ok"

    @property
    def peak_kind(self) -> str:
        return PEAK_KIND.get(self.format, "bf16")

    def apply(self, module: nn.Module, select: Select | None = None, *, whole_model: bool = False) -> nn.Module:
        """Quantize ``module`` in place (and compile it for a ``+compile`` variant); returns the
        module to call. Raises :class:`Unavailable` if the variant cannot run."""
        if not self.available:
            raise Unavailable(self.status)
        if whole_model and self.quantize_model is not None:
            self.quantize_model(module)
        elif self.quantize is not None:
            self.quantize(module, select or (lambda name, layer: True))
        if self.attention is not None:
            from qkernels.attention.diffusers_plugin import set_attention

            set_attention(module, self.attention)
        if self.fuse:
            from qpipeline.blocks import fuse_model

            report = fuse_model(module)
            if report.kept:
                raise Unavailable(f"blocks not fused: {report.kept[0][1]}")
        if self.graphs:
            from qpipeline.graphs import enable_cuda_graphs

            if not any(t.is_cuda for t in [*module.parameters(), *module.buffers()][:1]):
                raise Unavailable("CUDA graphs need CUDA")
            enable_cuda_graphs(module)
        if self.compiled:
            # dynamic=False: one specialised graph per shape, as a deployment with fixed
            # resolutions gets (the gemm sweep raises the recompile limit to match). A
            # transformer is compiled block by block (regional compilation, as diffusers'
            # compile_repeated_blocks): 60 identical blocks compile once, not 60 times inlined.
            blocks = getattr(module, "transformer_blocks", None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 1:
                for block in blocks:
                    block.compile(dynamic=False)
                return module
            return torch.compile(module, dynamic=False)
        return module


def swap_linears(root: nn.Module, select: Select, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace each selected ``nn.Linear`` under ``root`` by ``make(linear)``, one at a time,
    dropping the original before the next (bounded memory). Returns the number replaced.
    ``root`` itself is never replaced (quantize a Linear by wrapping it in a container)."""
    names = [n for n, m in root.named_modules() if type(m) is nn.Linear and n and select(n, m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        new = make(getattr(parent, child))
        setattr(parent, child, new)
        del new
    return len(names)


# --------------------------------------------------------------------------------------------
# qkernels backends


def _qkernels_variant(backend: str, fmt: str) -> Variant:
    def quantize(root, select):
        def make(lin):
            reason = qkernels.get_backend(backend).unsupported_shape_reason(lin.in_features, lin.out_features)
            if reason:  # shape the kernel cannot take: keep bf16, as quantize_model does
                return lin
            return QuantLinear.from_linear(lin, backend)

        swap_linears(root, select, make)

    return Variant(backend, "qkernels", fmt, quantize=quantize)


# --------------------------------------------------------------------------------------------
# peers


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _torchao_variants(device: torch.device) -> list[Variant]:
    names = [("torchao-int8-dynamic", "w8a8-int8"), ("torchao-fp8-rowwise", "w8a8-fp8")]
    if not _installed("torchao"):
        return [Variant(n, "torchao", f, status="not installed") for n, f in names]
    try:
        import torchao  # noqa: F401
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
            quantize_,
        )
    except Exception as exc:  # an install built for another torch
        return [Variant(n, "torchao", f, status=f"unavailable: import failed: {exc}"[:200]) for n, f in names]

    def make(config_fn):
        def quantize(root, select):
            quantize_(root, config_fn(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and select(fqn, m))

        return quantize

    out = [Variant("torchao-int8-dynamic", "torchao", "w8a8-int8",
                   quantize=make(Int8DynamicActivationInt8WeightConfig))]
    fp8 = Variant("torchao-fp8-rowwise", "torchao", "w8a8-fp8",
                  quantize=make(lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())))
    # torchao asserts on compute capability when quantizing; ask it once on a tiny layer.
    try:
        probe = nn.Linear(32, 32, dtype=torch.bfloat16, device=device)
        fp8.quantize(nn.Sequential(probe), lambda n, m: True)
    except Exception as exc:
        fp8.status = f"unavailable: {str(exc).strip().splitlines()[0][:160]}"
    out.append(fp8)
    return out


def _bnb_variant(device: torch.device) -> Variant:
    name = "bnb-int8"
    if not _installed("bitsandbytes"):
        return Variant(name, "bitsandbytes", "w8a8-int8", status="not installed")
    try:
        import bitsandbytes as bnb
    except Exception as exc:
        return Variant(name, "bitsandbytes", "w8a8-int8", status=f"unavailable: import failed: {exc}"[:200])

    def quantize(root, select):
        def make(lin):
            # threshold=6.0: LLM.int8() with fp16 outlier columns, what diffusers'
            # BitsAndBytesConfig(load_in_8bit=True) uses by default.
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="cpu")
            sd = {k: v.detach().to("cpu") for k, v in lin.state_dict().items()}
            q.load_state_dict(sd)
            return q.to(device)  # Int8Params quantizes on the move to the device

        swap_linears(root, select, make)

    v = Variant(name, "bitsandbytes", "w8a8-int8", quantize=quantize)
    if device.type != "cuda":
        # bitsandbytes.autograd._functions.matmul routes CPU inputs to MatMul8bitFp.
        v.note = "on CPU bitsandbytes dequantizes the int8 weight and multiplies in bf16 (weight-only)"
    try:
        probe = nn.Sequential(nn.Linear(64, 64, dtype=torch.bfloat16))
        v.quantize(probe, lambda n, m: True)
        probe.to(device)(torch.randn(4, 64, dtype=torch.bfloat16, device=device))
    except Exception as exc:
        v.status = f"unavailable: {str(exc).strip().splitlines()[0][:160]}"
    return v


def _layerwise_variant() -> Variant:
    name = "diffusers-layerwise-fp8"
    if not _installed("diffusers"):
        return Variant(name, "diffusers", "w8-fp8", status="not installed")
    try:
        from diffusers.hooks import apply_layerwise_casting
    except Exception as exc:
        return Variant(name, "diffusers", "w8-fp8", status=f"unavailable: {exc}"[:200])

    def quantize(root, select):
        # Unscaled e4m3 storage, bf16 compute: diffusers' casting hook on each selected Linear.
        for n, m in list(root.named_modules()):
            if type(m) is nn.Linear and select(n, m):
                apply_layerwise_casting(m, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16,
                                        skip_modules_pattern=None)

    def quantize_model(model):
        # What users call: the model's own method, with diffusers' default skip list
        # (pos_embed, patch_embed, norm, proj_in, proj_out).
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)

    return Variant(name, "diffusers", "w8-fp8", quantize=quantize, quantize_model=quantize_model)


def all_variants(device: torch.device | str, *, peers: bool = True, compile_peers: bool = False,
                 compile_ours: bool = False, only: list[str] | None = None,
                 model_level: bool = False) -> list[Variant]:
    """bf16, then every registered qkernels backend (unavailable ones with their reason), then
    the peers. ``compile_*`` adds a ``+compile`` twin of each available variant of that group
    (bf16 gets one whenever either flag is set, so compiled peers have a compiled baseline).
    ``model_level``: also the variants that change a whole model rather than its Linears (the
    fused block path, CUDA graphs, quantized attention): the e2e benchmark's; a layer benchmark
    would time them as their plain backend again."""
    device = torch.device(device)
    out = [Variant("bf16", "bf16", "none")]
    for row in list_backends(device):
        if row.name == "bf16":
            continue
        v = _qkernels_variant(row.name, row.format)
        if not row.available:
            v.status = f"unavailable: {row.reason}"
        elif device.type == "cpu" and row.name.endswith("-triton"):
            # Available on CPU only through TRITON_INTERPRET=1 (tests): timing numpy emulation of
            # a GPU kernel says nothing, and at M=512 one call takes minutes.
            v.status = "unavailable: Triton on CPU is the interpreter (tests only), not benchmarked"
        out.append(v)
    # The fused block path (qpipeline.blocks) over the Triton backends, and fp8 with its pointer
    # GEMM only (the default takes the TMA GEMM from FP8Triton.TMA_MIN_M tokens on).
    for v in list(out):
        if v.name == "fp8-triton":
            out.append(dataclasses.replace(v, name="fp8-triton+noreplay", replay=False))
        if not model_level:
            continue
        if v.name in ("int8-triton", "fp8-triton"):
            out.append(dataclasses.replace(v, name=v.name + "+fused", fuse=True))
        if v.name == "fp8-triton":
            out.append(dataclasses.replace(v, name="fp8-triton+fused+noreplay", fuse=True, replay=False))
            out.append(dataclasses.replace(v, name="fp8-triton+fused+notma", fuse=True, tma_min_m=None))
            out.append(dataclasses.replace(v, name="fp8-triton+fused+graphs", fuse=True, graphs=True))
            out.append(dataclasses.replace(v, name="fp8-triton+fused+int8attn", fuse=True, attention="int8-fp8"))
            out.append(dataclasses.replace(v, name="fp8-triton+fused+int8attn+graphs", fuse=True, graphs=True,
                                           attention="int8-fp8"))
    if device.type == "cuda" and model_level:
        out.insert(1, dataclasses.replace(out[0], name="bf16+graphs", graphs=True))
    if peers:
        out += _torchao_variants(device)
        out.append(_bnb_variant(device))
        out.append(_layerwise_variant())

    compiled = []
    for v in out:
        wants = (v.family == "torchao" and compile_peers) or (v.family == "qkernels" and compile_ours) or (
            v.family == "bf16" and (compile_peers or compile_ours))
        if wants:
            compiled.append(dataclasses.replace(v, name=v.name + "+compile", compiled=True))
    out += compiled
    if only:
        out = [v for v in out if v.name in only or v.name == "bf16"]
    return out
