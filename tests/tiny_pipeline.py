"""The tiny edit pipeline the tests run: it lives in the package (``qpipeline.demo_pipeline``)
because ``python -m qpipeline.serve --demo`` serves it too; the tests import it from here."""

from qpipeline.demo_pipeline import (  # noqa: F401
    SPECIAL_TOKENS, TEXT_HIDDEN, Z_DIM, Qwen2VLImageOnlyProcessor, build_pipeline, build_processor,
    build_text_encoder, build_tokenizer, build_transformer, build_vae, reference_images, save_pipeline,
    small_vae_references,
)
