"""Block adapters: rewire a quantized transformer block to the fused kernels, or leave it as it
is with the reason.

An adapter is one class with ``@register_block_adapter``: ``matches(module)`` says whether it
knows the block type, ``fuse(module)`` returns None once the block computes through the fused
path (same submodules, same state-dict keys) or the reason it cannot, ``unfuse(module)`` undoes
it. Qwen-Image's double-stream block is the first entry (``qwen_image.py``); FLUX's double and
single blocks are the next obvious ones.

    report = fuse_model(transformer)      # after quantize_model / load_quantized, on its device
    print(report.format())
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

__all__ = ["BlockAdapter", "register_block_adapter", "fuse_model", "unfuse_model", "FuseReport"]


class BlockAdapter:
    name: str = ""

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def fuse(self, module: nn.Module) -> str | None:
        raise NotImplementedError

    def unfuse(self, module: nn.Module) -> None:
        raise NotImplementedError

    def is_fused(self, module: nn.Module) -> bool:
        raise NotImplementedError


_ADAPTERS: list[BlockAdapter] = []


def register_block_adapter(cls: type[BlockAdapter]) -> type[BlockAdapter]:
    _ADAPTERS.append(cls())
    return cls


def _load_builtin() -> None:
    from . import qwen_image  # noqa: F401  (registers on import)


@dataclass
class FuseReport:
    fused: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (block name, reason)

    def format(self) -> str:
        lines = [f"fused {len(self.fused)} block(s)" + (f", kept {len(self.kept)} as they are" if self.kept else "")]
        reasons: dict[str, list[str]] = {}
        for name, why in self.kept:
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"  not fused ({why}): {shown}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"fused": list(self.fused), "kept": [list(k) for k in self.kept]}


def fuse_model(model: nn.Module) -> FuseReport:
    """Fuse every block some adapter knows; returns which were fused and why the others were not.
    Fuse once the model is on the device it runs on (the fused QKV weight is concatenated there)."""
    _load_builtin()
    report = FuseReport()
    for name, module in model.named_modules():
        for adapter in _ADAPTERS:
            if adapter.matches(module):
                why = None if adapter.is_fused(module) else adapter.fuse(module)
                if why is None:
                    report.fused.append(name)
                else:
                    report.kept.append((name, why))
                break
    return report


def unfuse_model(model: nn.Module) -> int:
    """Undo :func:`fuse_model`; returns how many blocks were unfused."""
    _load_builtin()
    n = 0
    for module in model.modules():
        for adapter in _ADAPTERS:
            if adapter.matches(module) and adapter.is_fused(module):
                adapter.unfuse(module)
                n += 1
                break
    return n
