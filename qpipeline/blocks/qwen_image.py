"""Fused Qwen-Image double-stream block (diffusers' ``QwenImageTransformerBlock``).

Per stream and block, the fused forward runs: the modulation Linear (as the recipe left it) ->
LayerNorm + modulate + quant (one kernel) -> q|k|v as one GEMM -> q/k RMSNorm + RoPE into the
joint [text, image] attention layout (one kernel, both streams) -> attention (no mask when the
pipeline gives none; no layout copies) -> one quant pass over the attention output -> out
projection with ``residual + gate * y`` in its epilogue -> LayerNorm + modulate + quant -> MLP up
with GELU-tanh in its epilogue -> quant -> MLP down with the gated residual in its epilogue.
About 24 launches a block against ~110 unfused, and the bf16 [M, 3072] elementwise passes
between them are gone.

The arithmetic is the unfused block's (each op rounding in the activation dtype as it does;
see ``qkernels.ops.fused``), with the same quantization decisions, so fused and unfused agree to
the order of fp32 reductions.

The block keeps its submodules and state-dict keys: fusing swaps its class for a subclass with
the fused forward and concatenates the three q/k/v weights of each stream into one [3N, K]
tensor that the three layers' weights become views of (no second copy).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qkernels import attention, formats
from qkernels.backends.triton_backends import kernels_for
from qkernels.linear import QuantizedActivation, QuantLinear
from qkernels.ops import fused as fused_ops
from qkernels.ops import quantize_per_token

from . import BlockAdapter, register_block_adapter

_W8A8 = ("w8a8-int8", "w8a8-fp8")


def _block_class():
    try:
        from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
    except Exception:  # diffusers missing or too old: nothing to fuse
        return None
    return QwenImageTransformerBlock


# --------------------------------------------------------------------------------------------
# Per-forward inputs shared by the 60 blocks: prepared once (first block), reused by identity.


class _Prepared:
    __slots__ = ("key", "img_rows", "txt_rows", "rope_img", "rope_txt", "mask", "lengths", "l_txt")


# Where a text key-padding mask is applied by slicing the padded keys out (each sample attended
# alone, unmasked) instead of passing the mask to SDPA: on CUDA, whose fast SDPA kernels take no
# mask (a batched-CFG forward, whose shorter prompt is padded, otherwise falls to a slower
# kernel). The CPU keeps the mask, so fused and unfused stay bit-equal there; tests flip it.
SLICE_PADDED_KEYS = {"cuda": True, "cpu": False}


_LAST: _Prepared | None = None


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x is y if isinstance(x, torch.Tensor) or x is None else x == y
                                    for x, y in zip(a, b))


def _prepare(batch, l_img, l_txt, modulate_index, rope, mask, device, joint: bool = False) -> _Prepared:
    """Gate rows (each token's modulation row), RoPE as [L, D/2, 2] fp32 and the joint mask, for
    this forward's inputs. Every block receives the same tensor objects, so the work is done in
    the first block and found by identity in the 59 others (no host sync, no per-block copies)."""
    global _LAST
    img_freqs, txt_freqs = rope
    key = (batch, l_img, l_txt, device, modulate_index, img_freqs, txt_freqs, mask, joint)
    if _LAST is not None and _same(_LAST.key, key):
        return _LAST
    p = _Prepared()
    p.key = key
    b = torch.arange(batch, device=device, dtype=torch.int32)
    # Edit-2511 (zero_cond_t): the modulation has 2B rows, [:B] for the noisy tokens (index 0)
    # and [B:] for the reference-image tokens (index 1).
    if modulate_index is None:
        p.img_rows = b.repeat_interleave(l_img)
    else:
        p.img_rows = (b[:, None] + batch * modulate_index.to(device, torch.int32)).reshape(-1)
    p.txt_rows = b.repeat_interleave(l_txt)
    p.rope_img = torch.view_as_real(img_freqs.to(device)).float().contiguous()
    p.rope_txt = torch.view_as_real(txt_freqs.to(device)).float().contiguous()
    p.l_txt, p.lengths = l_txt, None
    # An all-ones text mask masks nothing: attend without one (the fast kernels take no mask).
    # One host sync per forward, not per block; kept as it is while a CUDA graph is captured.
    capturing = mask is not None and mask.is_cuda and torch.cuda.is_current_stream_capturing()
    if mask is not None and not capturing and SLICE_PADDED_KEYS.get(torch.device(device).type, False):
        p.lengths = _prefix_lengths(mask, l_txt, joint)
        if p.lengths is not None and all(n == l_txt for n in p.lengths):
            mask, p.lengths = None, None
    if mask is None or (not capturing and p.lengths is None and bool(mask.all())):
        p.mask = None
    elif joint:  # [B, S_txt + S_img], the image part ones by construction (diffusers <= 0.37)
        p.mask = mask.to(device, torch.bool)[:, None, None, :]
    else:
        joint_mask = torch.cat([mask.to(device, torch.bool),
                                torch.ones(batch, l_img, dtype=torch.bool, device=device)], 1)
        p.mask = joint_mask[:, None, None, :]
    _LAST = p
    return p


def _prefix_lengths(mask: torch.Tensor, l_txt: int, joint: bool) -> list[int] | None:
    """Each sample's valid text length where the mask is right padding (ones, then zeros; the
    image part all ones), else None. One host sync."""
    m = mask.to(torch.bool)
    txt = m[:, :l_txt] if joint else m
    lengths = txt.sum(1)
    ok = (txt == (torch.arange(l_txt, device=m.device)[None] < lengths[:, None])).all()
    if joint:
        ok = ok & m[:, l_txt:].all()
    *lengths, ok = torch.cat([lengths, ok.long()[None]]).tolist()
    return lengths if ok else None


# --------------------------------------------------------------------------------------------
# attention


def _attention_mode(block) -> str:
    """qkernels.attention's mode for this block: the processor's when qkernels' own is set
    (``set_attention`` / recipe ``attention``), else the fastest bf16 SDPA (cuDNN first on Hopper:
    601 TFLOP/s at S = 8,400 on the H200 against flash 357; probe-60-blocks.json)."""
    return getattr(block.attn.processor, "mode", "bf16")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prep: _Prepared, mode: str) -> torch.Tensor:
    """Joint attention on [B, S, H, D] q/k/v (transposed views, no copies); returns [B, S, H, D].

    With right-padded text (``prep.lengths``, bf16 mode; the int8-fp8 kernel takes the mask
    itself) each sample attends alone to its own keys, the padded text keys cut out (a copy of
    k and v for a padded sample): softmax over the same keys as the masked call, with no mask,
    so SDPA keeps its fast kernels. A padded query row attends as under the mask."""
    if prep.lengths is None or mode != "bf16":
        return attention.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=prep.mask,
                              mode=mode).transpose(1, 2)
    outs = []
    for b, n in enumerate(prep.lengths):
        kb, vb = k[b:b + 1], v[b:b + 1]
        if n < prep.l_txt:
            kb, vb = (torch.cat([t[:, :n], t[:, prep.l_txt:]], 1) for t in (kb, vb))
        outs.append(attention.sdpa(q[b:b + 1].transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2),
                                   mode=mode).transpose(1, 2))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# --------------------------------------------------------------------------------------------
# the fused forward


def _lmq(k, x2d, mod, col, rows, eps, fp8, dtype):
    d = x2d.shape[1]
    q, s = k.layernorm_modulate_quant(x2d, mod[:, col:col + d], mod[:, col + d:col + 2 * d], rows, eps, fp8)
    return QuantizedActivation(q, s, dtype)


# The ops (Triton on CUDA, the PyTorch references elsewhere); a block whose layers compute with a
# Triton backend uses that backend's kernels instead, which on CPU are the interpreted launchers.
_OPS = SimpleNamespace(layernorm_modulate_quant=fused_ops.layernorm_modulate_quant,
                       qk_norm_rope=fused_ops.qk_norm_rope, quantize_per_token=quantize_per_token)


def _kernels(layer, x):
    return kernels_for(x) if layer.backend in ("int8-triton", "fp8-triton") else _OPS


class _FusedState:
    """What fusing computed once for a block: the fused q|k|v layers, the format, the norms."""

    __slots__ = ("qkv_img", "qkv_txt", "fp8", "heads", "eps_norm", "eps_rms")


class FusedQwenImageTransformerBlock:
    """Mixin whose forward replaces ``QwenImageTransformerBlock.forward`` (see module doc)."""

    _qk_fused: _FusedState

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, temb=None,
                image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
        joint_mask = None
        if (joint_attention_kwargs and set(joint_attention_kwargs) == {"attention_mask"}
                and encoder_hidden_states_mask is None):
            # diffusers <= 0.37 passes the text padding mask as the joint key mask it built once
            joint_mask = joint_attention_kwargs["attention_mask"]
            joint_attention_kwargs = None
            if joint_mask is not None and (joint_mask.dim() != 2 or joint_mask.shape[1] != (
                    hidden_states.shape[1] + encoder_hidden_states.shape[1])):
                joint_attention_kwargs = {"attention_mask": joint_mask}  # a form we do not know: the block's own path
        if joint_attention_kwargs or image_rotary_emb is None:
            # attention kwargs (e.g. a LoRA scale for PEFT) or no RoPE: the block's own path
            return super().forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                                   image_rotary_emb, joint_attention_kwargs, modulate_index)
        st = self._qk_fused
        dtype = hidden_states.dtype
        batch, l_img, dim = hidden_states.shape
        l_txt = encoder_hidden_states.shape[1]
        prep = _prepare(batch, l_img, l_txt, modulate_index, image_rotary_emb,
                        encoder_hidden_states_mask if joint_mask is None else joint_mask, hidden_states.device,
                        joint=joint_mask is not None)
        img_mod = self.img_mod(temb)  # [B or 2B, 6 * dim]: shift1 | scale1 | gate1 | shift2 | scale2 | gate2
        txt_mod = self.txt_mod(torch.chunk(temb, 2, dim=0)[0] if self.zero_cond_t else temb)
        h = hidden_states.reshape(batch * l_img, dim)
        e = encoder_hidden_states.reshape(batch * l_txt, dim)
        attn = self.attn
        kn = _kernels(attn.to_q, h)

        # attention
        xi = _lmq(kn, h, img_mod, 0, prep.img_rows, st.eps_norm, st.fp8, dtype)
        xt = _lmq(kn, e, txt_mod, 0, prep.txt_rows, st.eps_norm, st.fp8, dtype)
        qkv_i = st.qkv_img.forward_quantized(xi)
        qkv_t = st.qkv_txt.forward_quantized(xt)
        norms = [None if n is None else n.weight
                 for n in (attn.norm_added_q, attn.norm_added_k, attn.norm_q, attn.norm_k)]  # txt q, k; img q, k
        q, k, v = kn.qk_norm_rope(qkv_t, qkv_i, batch, st.heads, *norms, prep.rope_txt, prep.rope_img, st.eps_rms)
        o = _attention(q, k, v, prep, _attention_mode(self)).reshape(batch, l_txt + l_img, dim)
        if batch == 1:  # one quant pass over the joint output; the streams are row ranges of it
            qo, so = kn.quantize_per_token(o.reshape(-1, dim).contiguous(), None, st.fp8)
            ot = QuantizedActivation(qo[:l_txt], so[:l_txt], dtype)
            oi = QuantizedActivation(qo[l_txt:], so[l_txt:], dtype)
        else:
            ot = QuantizedActivation(*kn.quantize_per_token(o[:, :l_txt].reshape(-1, dim), None, st.fp8), dtype)
            oi = QuantizedActivation(*kn.quantize_per_token(o[:, l_txt:].reshape(-1, dim), None, st.fp8), dtype)
        h = attn.to_out[0].forward_quantized(oi, residual=h, gate=img_mod[:, 2 * dim:3 * dim], gate_rows=prep.img_rows)
        e = attn.to_add_out.forward_quantized(ot, residual=e, gate=txt_mod[:, 2 * dim:3 * dim],
                                              gate_rows=prep.txt_rows)

        # MLPs
        h = self._fused_mlp(kn, self.img_mlp, h, img_mod, prep.img_rows, st, dtype)
        e = self._fused_mlp(kn, self.txt_mlp, e, txt_mod, prep.txt_rows, st, dtype)
        if dtype == torch.float16:
            h, e = h.clip(-65504, 65504), e.clip(-65504, 65504)
        return e.reshape(batch, l_txt, dim), h.reshape(batch, l_img, dim)

    @staticmethod
    def _fused_mlp(kn, mlp, x, mod, rows, st, dtype):
        dim = x.shape[1]
        a = _lmq(kn, x, mod, 3 * dim, rows, st.eps_norm, st.fp8, dtype)
        up = mlp.net[0].proj.forward_quantized(a, gelu=True)
        u = QuantizedActivation(*kn.quantize_per_token(up, None, st.fp8), dtype)
        return mlp.net[2].forward_quantized(u, residual=x, gate=mod[:, 5 * dim:6 * dim], gate_rows=rows)

    def _apply(self, fn, recurse=True):
        # Moving the block moves each q/k/v layer on its own (their weights stop being views of
        # the fused one): re-concatenate on the new device, one stream at a time.
        super()._apply(fn, recurse)
        st = self._qk_fused
        for name, layers in (("qkv_img", _qkv_layers(self.attn, "img")), ("qkv_txt", _qkv_layers(self.attn, "txt"))):
            fused = getattr(st, name)
            if layers[0].weight.untyped_storage().data_ptr() != fused.weight.untyped_storage().data_ptr():
                setattr(st, name, _concat_qkv(layers))
        return self


# --------------------------------------------------------------------------------------------
# fusing


def _qkv_layers(attn, stream):
    return (attn.to_q, attn.to_k, attn.to_v) if stream == "img" else (attn.add_q_proj, attn.add_k_proj,
                                                                     attn.add_v_proj)


_STATE_FIELDS = ("weight", "weight_scale", "bias")


def _concat_qkv(layers) -> QuantLinear:
    """One [3N, K] QuantLinear from q, k, v (same format and backend), whose tensors the three
    layers' become row views of: the product is the three GEMMs' side by side, and no tensor is
    held twice."""
    first = layers[0]
    n = sum(layer.out_features for layer in layers)
    has_bias = first.bias is not None
    fused = QuantLinear(first.in_features, n, has_bias, format=first.format, backend=first.backend,
                        bias_dtype=first.bias.dtype if has_bias else torch.bfloat16, device="meta")
    offsets = [0]
    for layer in layers:
        offsets.append(offsets[-1] + layer.out_features)
    for name in _STATE_FIELDS:
        parts = [getattr(layer, name) for layer in layers]
        if parts[0] is None:
            continue
        whole = torch.cat(parts, 0)
        setattr(fused, name, whole)
        for layer, lo, hi in zip(layers, offsets, offsets[1:]):
            setattr(layer, name, whole[lo:hi])
    fused.set_backend(first.backend)
    return fused


def _split_qkv(layers) -> None:
    for layer in layers:
        for name in _STATE_FIELDS:
            t = getattr(layer, name)
            if t is not None:
                setattr(layer, name, t.clone())


def _why_not(block) -> str | None:
    attn = block.attn
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    from qkernels.attention.diffusers_plugin import QKernelsQwenAttnProcessor

    if type(attn.processor) not in (QwenDoubleStreamAttnProcessor2_0, QKernelsQwenAttnProcessor):
        return f"custom attention processor {type(attn.processor).__name__}"
    if getattr(attn.processor, "_parallel_config", None) is not None:
        return "context parallelism is set on the attention (the fused block computes the whole sequence)"
    for mlp in (block.img_mlp, block.txt_mlp):
        if getattr(mlp.net[0], "approximate", None) != "tanh" or not hasattr(mlp.net[0], "proj"):
            return "MLP activation is not GELU-tanh"
    linears = {
        "attn.to_q": attn.to_q, "attn.to_k": attn.to_k, "attn.to_v": attn.to_v,
        "attn.add_q_proj": attn.add_q_proj, "attn.add_k_proj": attn.add_k_proj, "attn.add_v_proj": attn.add_v_proj,
        "attn.to_out.0": attn.to_out[0], "attn.to_add_out": attn.to_add_out,
        "img_mlp.net.0.proj": block.img_mlp.net[0].proj, "img_mlp.net.2": block.img_mlp.net[2],
        "txt_mlp.net.0.proj": block.txt_mlp.net[0].proj, "txt_mlp.net.2": block.txt_mlp.net[2],
    }
    fmts = set()
    for name, layer in linears.items():
        if not isinstance(layer, QuantLinear):
            return f"{name} is not quantized"
        if layer.format not in _W8A8:
            return f"{name} is {layer.format} (weight-only): the fused path feeds 8-bit activations"
        if layer.input_smooth is not None:
            return f"{name} is smoothed (SmoothQuant): its quant pass divides by its own factors"
        if layer.input_scale is not None:
            return f"{name} has a static activation scale (the fused kernels quantize per token)"
        if layer.lora_names:
            return f"{name} carries run-time LoRA branches (they need the bf16 input)"
        if layer.weight.device.type == "meta":
            return f"{name} has no weights loaded"
        fmts.add(layer.format)
    if len(fmts) != 1:
        return f"mixed formats {sorted(fmts)}"
    for stream in ("img", "txt"):
        layers = _qkv_layers(attn, stream)
        if len({(x.in_features, x.backend, x.weight.device, x.bias is not None) for x in layers}) != 1:
            return f"{stream} q/k/v layers differ in shape, backend, device or bias"
    norms = [attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k]
    if not (all(n is None for n in norms) or all(getattr(n, "weight", None) is not None for n in norms)):
        return "q/k norms are neither all RMSNorm with weights nor all absent"
    if any(n is not None and type(n).__name__ != "RMSNorm" for n in norms):
        return "q/k norms are not RMSNorm"
    if not (block.img_norm1.eps == block.img_norm2.eps == block.txt_norm1.eps == block.txt_norm2.eps):
        return "LayerNorm eps differ between norms"
    head_dim = attn.inner_dim // attn.heads
    if head_dim % 2 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not a power of two"
    return None


@register_block_adapter
class QwenImageBlockAdapter(BlockAdapter):
    name = "qwen-image"
    _subclasses: dict[type, type] = {}

    def matches(self, module):
        cls = _block_class()
        return cls is not None and isinstance(module, cls)

    def is_fused(self, module):
        return isinstance(module, FusedQwenImageTransformerBlock)

    def fuse(self, block):
        why = _why_not(block)
        if why is not None:
            return why
        attn = block.attn
        st = _FusedState()
        st.qkv_img = _concat_qkv(_qkv_layers(attn, "img"))
        st.qkv_txt = _concat_qkv(_qkv_layers(attn, "txt"))
        st.fp8 = formats.get_format(attn.to_q.format).is_fp8
        st.heads = attn.heads
        st.eps_norm = block.img_norm1.eps
        st.eps_rms = attn.norm_q.eps if attn.norm_q is not None else 1e-6
        base = type(block)
        sub = self._subclasses.get(base)
        if sub is None:
            sub = type(f"Fused{base.__name__}", (FusedQwenImageTransformerBlock, base), {})
            self._subclasses[base] = sub
        block._qk_fused = st
        block.__class__ = sub
        return None

    def unfuse(self, block):
        for stream in ("img", "txt"):
            _split_qkv(_qkv_layers(block.attn, stream))
        del block._qk_fused
        block.__class__ = block.__class__.__mro__[2]
