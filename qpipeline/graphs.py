"""CUDA-graph replay of a transformer's block loop, per input shape.

The Qwen-Image forward itself cannot be captured (it builds ``modulate_index`` from a Python
list and copies host tensors each call), but the loop over its blocks can, and that is where the
launches are: at ~2,100 tokens the eager quantized forward is host-bound (benchmarks/results/h200
probe-graphs: 10 fp8 blocks 52.4 ms eager -> 14.3 ms replayed).

    enable_cuda_graphs(transformer)    # after quantize_model / fuse_model, on the GPU
    transformer(**inputs)              # first call per shape: eager warm-up + capture
    transformer(**inputs)              # replays: inputs copied into the graph's buffers
    disable_cuda_graphs(transformer)

The blocks stay registered where they were (state-dict keys unchanged); the block list yields one
runner to the model's loop, which replays the whole loop. A shape is keyed by every input's shape
and dtype (and which optional inputs are present); up to ``max_shapes`` graphs are kept (least
recently used dropped), each with its own memory pool (the activations of one forward). Outputs are the graph's own buffers, overwritten by the next replay.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
import torch.nn as nn

from qkernels.errors import InputError

__all__ = ["enable_cuda_graphs", "disable_cuda_graphs", "GraphedBlockList"]


def _flatten(x, out):
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (tuple, list)):
        for t in x:
            _flatten(t, out)
    elif isinstance(x, dict):
        for _, t in sorted(x.items()):
            _flatten(t, out)
    return out


def _signature(args: dict) -> tuple:
    def sig(v):
        if isinstance(v, torch.Tensor):
            return ("t", tuple(v.shape), v.dtype, v.device)
        if isinstance(v, (tuple, list)):
            return ("s", tuple(sig(t) for t in v))
        if isinstance(v, dict):  # e.g. an empty attention_kwargs
            return ("d", tuple((k, sig(t)) for k, t in sorted(v.items())))
        if v is None or isinstance(v, (int, float, bool, str)):
            return ("v", v)
        raise InputError(f"cannot key a CUDA graph on a {type(v).__name__} block input")

    return tuple((k, sig(v)) for k, v in sorted(args.items()))


class _Graph:
    def __init__(self, blocks, args: dict):
        self.static = {k: _clone(v) for k, v in args.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _run(blocks, self.static)  # warm-up on a side stream (autotune, lazy init), as torch documents
        torch.cuda.current_stream().wait_stream(stream)
        # The fused Qwen-Image blocks prepare per-forward tensors once and share them by identity
        # (qpipeline.blocks.qwen_image._LAST): let the capture make its own, in the graph's
        # private pool, and keep them alive as long as the graph.
        fused = sys.modules.get("qpipeline.blocks.qwen_image")
        if fused is not None:
            fused._LAST = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = _run(blocks, self.static)
        self.keep = fused._LAST if fused is not None else None
        if fused is not None:
            fused._LAST = None

    def replay(self, args: dict):
        for k, v in args.items():
            dst, src = _flatten(self.static[k], []), _flatten(v, [])
            for d, s in zip(dst, src):
                if d is not s:
                    d.copy_(s, non_blocking=True)
        self.graph.replay()
        return self.out


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, tuple):
        return tuple(_clone(t) for t in v)
    if isinstance(v, list):
        return [_clone(t) for t in v]
    if isinstance(v, dict):
        return {k: _clone(t) for k, t in v.items()}
    return v


def _run(blocks, args: dict):
    kw = dict(args)
    for block in blocks:
        kw["encoder_hidden_states"], kw["hidden_states"] = block(**kw)
    return kw["encoder_hidden_states"], kw["hidden_states"]


def _all_true(mask) -> bool:
    return isinstance(mask, torch.Tensor) and bool(mask.all())


def _without_all_ones_masks(kwargs: dict) -> dict:
    """A text mask that masks nothing, dropped before the graph is keyed and captured: eager
    attention drops it too (one host check per forward, qpipeline.blocks.qwen_image._prepare),
    and a capture cannot make that check, so it would record the masked attention kernels and
    replay numbers eager never computes. A real padding mask stays (and its forward runs the plain
    loop where the eager blocks slice padded keys out: GraphedBlockList.run)."""
    if _all_true(kwargs.get("encoder_hidden_states_mask")):
        kwargs = {**kwargs, "encoder_hidden_states_mask": None}
    jk = kwargs.get("joint_attention_kwargs")
    if isinstance(jk, dict) and _all_true(jk.get("attention_mask")):  # diffusers <= 0.37's joint mask
        kwargs = {**kwargs, "joint_attention_kwargs": {k: v for k, v in jk.items() if k != "attention_mask"} or None}
    return kwargs


def _has_padding(kwargs: dict) -> bool:
    jk = kwargs.get("joint_attention_kwargs")
    return kwargs.get("encoder_hidden_states_mask") is not None or (
        isinstance(jk, dict) and jk.get("attention_mask") is not None)


def _eager_slices_padding() -> bool:
    fused = sys.modules.get("qpipeline.blocks.qwen_image")
    return fused is not None and fused.SLICE_PADDED_KEYS.get("cuda", False)


class _Runner:
    """What the model's ``for block in self.transformer_blocks`` sees: one callable for all."""

    def __init__(self, owner: "GraphedBlockList"):
        self.owner = owner

    def __call__(self, **kwargs):
        return self.owner.run(kwargs)


class GraphedBlockList(nn.ModuleList):
    """A block list whose iteration yields one runner that replays the captured loop."""

    def __init__(self, blocks: nn.ModuleList, max_shapes: int = 4):
        super().__init__(list(blocks))
        self.max_shapes = max_shapes
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()

    def __iter__(self):
        if torch.is_grad_enabled() or not self._cuda():
            return super().__iter__()  # training, or not on CUDA: the plain loop
        return iter([_Runner(self)])

    def _cuda(self) -> bool:
        p = next(iter(self[0].parameters()), None) if len(self) else None
        b = next(iter(self[0].buffers()), None) if len(self) else None
        t = p if p is not None else b
        return t is not None and t.is_cuda

    def run(self, kwargs: dict):
        kwargs = _without_all_ones_masks(kwargs)
        if _has_padding(kwargs) and _eager_slices_padding():
            # Eager fused blocks cut padded text keys out per sample, by lengths read on the host;
            # a graph keyed by shape replays for any padding, so it could only take the masked
            # kernel and would not equal eager: padded inputs run the plain loop.
            return _run(list(nn.ModuleList.__iter__(self)), kwargs)
        key = _signature(kwargs)
        g = self._graphs.get(key)
        if g is None:
            g = _Graph(list(nn.ModuleList.__iter__(self)), kwargs)
            self._graphs[key] = g
            while len(self._graphs) > self.max_shapes:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return g.replay(kwargs)


def enable_cuda_graphs(model: nn.Module, max_shapes: int = 4) -> nn.Module:
    """Replay ``model.transformer_blocks``' loop from CUDA graphs (see the module doc)."""
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise InputError(f"{type(model).__name__} has no transformer_blocks ModuleList to capture")
    if not isinstance(blocks, GraphedBlockList):
        model.transformer_blocks = GraphedBlockList(blocks, max_shapes)
    return model


def disable_cuda_graphs(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "transformer_blocks", None)
    if isinstance(blocks, GraphedBlockList):
        model.transformer_blocks = nn.ModuleList(list(nn.ModuleList.__iter__(blocks)))
    return model
