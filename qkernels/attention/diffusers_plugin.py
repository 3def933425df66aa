"""qkernels attention inside a diffusers Qwen-Image transformer: an attention processor for its
double-stream (text + image) joint attention.

    >>> from qkernels.attention.diffusers_plugin import set_attention
    >>> set_attention(transformer, "int8-fp8")     # or "bf16"; None restores diffusers' processor

Why a processor and not a ``dispatch_attention_fn`` backend: diffusers' backends are members of
the ``AttentionBackendName`` enum, which has no extension point, and a backend only sees the
already concatenated joint q/k/v. The processor reads the text and image streams where they are:

* ``int8-fp8``: the quantization pass reads the text and image q/k/v ([B, S_i, H, D] views of the
  projections, no copy) and the kernel writes the two outputs in place: none of the three joint
  ``torch.cat`` copies, no [B, H, S, D] permute copies, no split ``.contiguous()`` copies. The text
  padding mask becomes the kernel's key bias (0 / -inf); a key-padding mask costs the kernel one
  fused multiply-add per score, so an all-ones mask costs nothing measurable.
* ``bf16``: torch SDPA (cuDNN first on Hopper) on [B, H, S, D] *views* of the joint q/k/v (SDPA
  takes strided inputs; diffusers' ``_native_cudnn`` backend ``.contiguous()``-copies all three),
  the mask passed only when the model was given one. SDPA's output has q's memory layout, so the
  [B, S, H*D] view and the text/image split are copies only for batch > 1.

The model's measured attention loss (``benchmarks/results/h200``: ~2.2 ms a block in the model at
8,400 tokens against 1.44 ms for cuDNN alone on contiguous unmasked inputs) came with an all-ones
``encoder_hidden_states_mask``: the processor then builds a [B, 1, 1, S] bool mask and SDPA runs
cuDNN with a bias. diffusers' Qwen-Image pipelines drop an all-ones prompt mask once per prompt
(``if prompt_embeds_mask.all(): None``), so real pipelines at batch 1 pass None; this processor
keeps any mask it is given (checking it would be a host sync in every block).

Context parallelism (``transformer.enable_parallelism``): diffusers sets ``_parallel_config`` on
every processor that has the attribute, as on its own. With it set, ``int8-fp8`` runs inside
diffusers' own templated context-parallel attention as the per-rank op: Ulysses (all-to-all over
heads, each rank the full sequence) works; ring attention needs the per-row log-sum-exp, which
the kernel does not return, and is refused with a clear error. ``bf16`` hands the whole call to
``dispatch_attention_fn`` with diffusers' native backend, which supports both.
"""

from __future__ import annotations

import torch

from ..errors import InputError, UnsupportedShapeError
from . import MODES, _bf16_sdpa, joint_attention

__all__ = ["QKernelsQwenAttnProcessor", "set_attention"]


def _cp_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """The per-rank op of diffusers' templated context-parallel attention ([B, S, H, D] in and out)."""
    if return_lse:
        raise UnsupportedShapeError("the int8-fp8 attention does not return the log-sum-exp that ring attention "
                                    "merges; use Ulysses context parallelism (ulysses_degree) or mode='bf16'")
    if dropout_p or is_causal or enable_gqa:
        raise UnsupportedShapeError("the int8-fp8 attention takes no dropout, causal mask or GQA")
    return joint_attention(None, None, None, query, key, value, attn_mask, scale)[1]


def _cp_backward_op(*args, **kwargs):
    raise UnsupportedShapeError("the int8-fp8 attention is inference-only (no backward)")


def _joint_mask(mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """A joint key mask as [B, S] bool, from [B, S] or [B, 1, 1, S] (True / nonzero: attend)."""
    if mask.dim() == 4 and mask.shape[1:3] == (1, 1):
        mask = mask[:, 0, 0]
    if mask.dim() != 2 or tuple(mask.shape) != (batch, seq):
        raise InputError(f"attention_mask must be the joint key mask [{batch}, {seq}] (text + image tokens), "
                         f"got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


class QKernelsQwenAttnProcessor:
    """Drop-in for diffusers' ``QwenDoubleStreamAttnProcessor2_0`` (same projections, norms, RoPE
    and output split), with the joint attention computed by ``qkernels.attention`` in ``mode``."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, mode: str = "int8-fp8"):
        if mode not in MODES:
            raise InputError(f"unknown attention mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise InputError("the Qwen-Image double-stream attention needs encoder_hidden_states (text stream)")
        if attention_mask is not None and encoder_hidden_states_mask is not None:
            raise InputError("give the text padding mask once: encoder_hidden_states_mask or the joint attention_mask")
        head_dim = attn.inner_dim // attn.heads
        img_q = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        img_k = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_v = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_q = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_k = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)

        mask = None
        if attention_mask is not None:
            # diffusers <= 0.37 builds the joint key mask [B, S_txt + S_img] itself and passes it here
            mask = _joint_mask(attention_mask, txt_q.shape[0], txt_q.shape[1] + hidden_states.shape[1])
        elif encoder_hidden_states_mask is not None:  # [B, S_txt] -> joint key mask [B, S_txt + S_img]
            txt_mask = encoder_hidden_states_mask.to(torch.bool)
            mask = torch.cat([txt_mask, txt_mask.new_ones(txt_mask.shape[0], hidden_states.shape[1])], dim=1)

        seq_txt = txt_q.shape[1]
        if self._parallel_config is not None:
            joint = self._parallel(txt_q, txt_k, txt_v, img_q, img_k, img_v, mask)
            txt_o, img_o = joint[:, :seq_txt], joint[:, seq_txt:]
        elif self.mode == "int8-fp8":
            txt_o, img_o = joint_attention(txt_q, txt_k, txt_v, img_q, img_k, img_v, mask)
        else:
            q, k, v = (torch.cat([t, i], dim=1).transpose(1, 2) for t, i in
                       ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
            out = _bf16_sdpa(q, k, v, None if mask is None else mask[:, None, None, :], None).transpose(1, 2)
            txt_o, img_o = out[:, :seq_txt], out[:, seq_txt:]
        txt_o = txt_o.flatten(2, 3).to(img_q.dtype)
        img_o = img_o.flatten(2, 3).to(img_q.dtype)
        img_o = attn.to_out[0](img_o.contiguous())
        if len(attn.to_out) > 1:
            img_o = attn.to_out[1](img_o)
        txt_o = attn.to_add_out(txt_o.contiguous())
        return img_o, txt_o

    def _parallel(self, txt_q, txt_k, txt_v, img_q, img_k, img_v, mask):
        """Under diffusers' context parallelism: its templated CP attention, our kernel per rank."""
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention, dispatch_attention_fn

        q, k, v = (torch.cat([t, i], dim=1) for t, i in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn_mask = None if mask is None else mask[:, None, None, :]
        if self.mode == "bf16":
            return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, backend=self._attention_backend,
                                         parallel_config=self._parallel_config)
        return _templated_context_parallel_attention(
            q, k, v, attn_mask, 0.0, False, None, False, False,
            forward_op=_cp_forward_op, backward_op=_cp_backward_op, _parallel_config=self._parallel_config)


def set_attention(transformer: torch.nn.Module, mode: str | None) -> int:
    """Give every Qwen-Image double-stream attention of ``transformer`` a
    :class:`QKernelsQwenAttnProcessor` in ``mode`` ("int8-fp8" or "bf16"), or back diffusers' own
    processor for ``mode=None``. Keeps a context-parallel config already set. Returns how many
    attention modules were changed; a model with none raises :class:`InputError`."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    if mode is not None and mode not in MODES:
        raise InputError(f"unknown attention mode {mode!r}; use one of {', '.join(MODES)} (or None)")
    n = 0
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if not isinstance(proc, (QwenDoubleStreamAttnProcessor2_0, QKernelsQwenAttnProcessor)):
            continue
        new = QwenDoubleStreamAttnProcessor2_0() if mode is None else QKernelsQwenAttnProcessor(mode)
        new._attention_backend = proc._attention_backend
        new._parallel_config = proc._parallel_config
        module.set_processor(new)
        n += 1
    if n == 0:
        raise InputError(f"{type(transformer).__name__} has no Qwen-Image double-stream attention "
                         "(QwenDoubleStreamAttnProcessor2_0) to replace")
    return n
