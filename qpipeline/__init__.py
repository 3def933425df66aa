"""qpipeline: model surgery, recipes, checkpoints and the quantize CLI."""
