"""A built-in transformer of the Qwen-Image architecture with seeded random weights.

Its weights are random: it exists so that the quantizer, the benchmarks and the tests run
anywhere with no download. Quality numbers from it say nothing about real images; shapes and
speed of its layers are those of the real model at the same widths.

Sizes (``DEMO_SIZES``):
    tiny        hidden 64, 2 blocks: unit tests (a few MB)
    small       hidden 1024, 4 blocks, real text width 3584: the CLI's default (~0.3 GB bf16)
    full-width  the real widths (hidden 3072, MLP 12288, adaLN 18432, text 3584); pick
                ``num_layers`` (60 is the real model, ~41 GB bf16)
"""

from __future__ import annotations

import torch

__all__ = ["DEMO_SIZES", "demo_config", "build_demo_transformer", "demo_inputs"]

# Qwen-Image's transformer config (diffusers QwenImageTransformer2DModel), 20B parameters.
QWEN_IMAGE_CONFIG = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)

DEMO_SIZES = {
    "tiny": dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=96,
                 axes_dims_rope=(8, 12, 12), in_channels=16, out_channels=4),
    "small": dict(num_layers=4, num_attention_heads=8),
    "full-width": dict(),
}


def demo_config(size: str = "small", **overrides) -> dict:
    """The diffusers config dict of a demo transformer (``overrides`` win, e.g. num_layers=8)."""
    if size not in DEMO_SIZES:
        raise ValueError(f"unknown demo size {size!r}; sizes: {', '.join(DEMO_SIZES)}")
    return {**QWEN_IMAGE_CONFIG, **DEMO_SIZES[size], **overrides}


@torch.no_grad()
def build_demo_transformer(size: str = "small", *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                           device: torch.device | str = "cpu", **overrides):
    """A ``QwenImageTransformer2DModel`` with seeded random weights (diffusers' own
    initialisation), built directly on ``device`` in ``dtype``: no float32 copy is made first,
    so a full-width model costs its bf16 size and no more."""
    from diffusers import QwenImageTransformer2DModel

    config = demo_config(size, **overrides)
    fork = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = QwenImageTransformer2DModel(**config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.eval().requires_grad_(False)
    return model


def demo_inputs(model, *, image_hw: tuple[int, int] = (8, 8), reference_hw: tuple[int, int] | None = None,
                text_tokens: int = 16, batch: int = 1, seed: int = 0, timestep: float = 0.5) -> dict:
    """Keyword arguments for ``model(**inputs)``: latent tokens of an image of ``image_hw``
    patches (plus an optional reference image, as the edit pipeline sends), text embeddings and
    a timestep, seeded, on the model's device and dtype.

    A 1024x1024 output is 64x64 = 4096 tokens; one ~1 MP reference adds ~4096 more.
    """
    p = next(model.parameters())
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(1, *image_hw)] + ([(1, *reference_hw)] if reference_hw else [])
    n_img = sum(h * w for _, h, w in shapes)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=p.device, dtype=p.dtype)

    return dict(
        hidden_states=randn(batch, n_img, cfg.in_channels),
        encoder_hidden_states=randn(batch, text_tokens, cfg.joint_attention_dim),
        encoder_hidden_states_mask=torch.ones(batch, text_tokens, dtype=torch.long, device=p.device),
        timestep=torch.full((batch,), timestep, dtype=p.dtype, device=p.device),
        img_shapes=[shapes] * batch,
        return_dict=False,
    )
