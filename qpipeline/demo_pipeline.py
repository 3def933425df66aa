"""A tiny ``diffusers.QwenImageEditPlusPipeline`` built entirely from local objects: what the
tests run and what ``python -m qpipeline.serve --demo`` serves. Its weights are random, so its
images are noise-like; it exists so the engine and the server run anywhere with no download.

Every component has the real class and wiring of Qwen-Image-Edit-2509/2511 (transformer, Wan-style
VAE, Qwen2.5-VL text encoder with its vision tower, byte-level BPE tokenizer with the Qwen chat
special tokens, Qwen2-VL processor, flow-match scheduler) at toy widths, with seeded random
weights. Nothing is downloaded: the tokenizer is a byte-level BPE with no merges (256 byte
tokens + the special tokens the prompt template uses), built in memory.

Sizes follow what the pipeline expects:
* transformer ``in_channels = 4 * z_dim`` (latents are packed in 2x2 patches) and
  ``out_channels = z_dim``; ``joint_attention_dim`` = the text encoder's hidden size.
* VAE scale factor 2**len(temperal_downsample) = 8: a 32x32 output is 2x2 packed tokens.
* The pipeline resizes each reference image to ~1 MP for the VAE (4096 tokens at this scale
  factor) and to ~384x384 for the text encoder; the image processor's ``longest_edge`` caps the
  vision tower's input at 56x56 px (16 patches) so it stays cheap.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

TEXT_HIDDEN = 16
Z_DIM = 4
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]


def build_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=SPECIAL_TOKENS[1:],
                         model_max_length=4096)
    return tok


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor. transformers 5 builds a Qwen2-VL video
    processor only with torchvision, which has no build for the torch this project pins; the
    edit pipeline sends images only, and the image path is Qwen2VLProcessor's own, unchanged.
    Module-level, so a saved pipeline folder names it in model_index.json and loads it back."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})
    return Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_text_encoder(tokenizer, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=len(tokenizer),
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            rope_theta=1000000.0,
        ),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=TEXT_HIDDEN),
        hidden_size=TEXT_HIDDEN, vocab_size=len(tokenizer),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=Z_DIM * 6, z_dim=Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM,
    ).eval()


def build_transformer(seed: int = 0, dtype=torch.bfloat16):
    from .demo import build_demo_transformer

    # "tiny" demo widths (hidden 64), adapted to the VAE and text encoder above.
    return build_demo_transformer("tiny", seed=seed, dtype=dtype, in_channels=4 * Z_DIM,
                                  out_channels=Z_DIM, joint_attention_dim=TEXT_HIDDEN)


def build_pipeline(seed: int = 0, dtype=torch.bfloat16):
    """The tiny pipeline, every component seeded by ``seed`` (same seed, same weights)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    tokenizer = build_tokenizer()
    return QwenImageEditPlusPipeline(
        transformer=build_transformer(seed, dtype),
        vae=build_vae(seed).to(dtype),
        text_encoder=build_text_encoder(tokenizer, seed).to(dtype),
        tokenizer=tokenizer,
        processor=build_processor(tokenizer),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def save_pipeline(directory, seed: int = 0) -> None:
    """``save_pretrained`` output of the tiny pipeline (safetensors everywhere)."""
    build_pipeline(seed).save_pretrained(str(directory), safe_serialization=True)


def reference_images(n: int = 1, size: int = 32, seed: int = 0):
    """``n`` seeded random RGB PIL images of ``size`` px (never blank: a blank image hides errors)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@contextlib.contextmanager
def small_vae_references(pixels: int = 64 * 64):
    """Lower the edit pipeline's reference resize target (``VAE_IMAGE_SIZE``, ~1 MP) for tests and
    the demo server (process-wide: it is a module constant of diffusers).

    At 1 MP the tiny VAE's encoder alone takes 5-9 s per call on 2 CPU cores (memory-bound
    pads and norms over 1024x1024xC activations) and adds 4096 reference tokens; at 64x64 px it
    is 64 tokens and milliseconds. Only that constant changes: every code path is the pipeline's.
    """
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    old = edit_plus.VAE_IMAGE_SIZE
    edit_plus.VAE_IMAGE_SIZE = pixels
    try:
        yield
    finally:
        edit_plus.VAE_IMAGE_SIZE = old


def demo_dtype(device) -> torch.dtype:
    """The dtype the demo engine computes in: float32 on CPU, where bf16 conv3d (the VAE) is slow
    (a 32x32 edit took 8.8 s in bf16 and 1.9 s in float32 on 2 cores), bf16 elsewhere."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def demo_engine(directory, backend: str = "auto", device=None, seed: int = 0, **engine_kwargs):
    """An ``Engine`` over the tiny pipeline in ``directory``, saved there first (seeded by ``seed``)
    when the folder holds no pipeline. Not loaded yet. What ``qpipeline.serve --demo`` serves, so a
    test that builds the same engine gets the same images for the same request."""
    from pathlib import Path

    from .engine import Engine

    directory = Path(directory)
    if not (directory / "model_index.json").is_file():
        save_pipeline(directory, seed=seed)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return Engine(directory, backend=backend, device=device, dtype=demo_dtype(device), **engine_kwargs)
