"""One rank of the context-parallel check in tests/test_attention.py (run by torch.distributed.run,
2 CPU processes over gloo): the small Qwen-Image transformer with qkernels' attention processor,
single-process output vs under diffusers' context parallelism. Prints one line on rank 0."""

import sys

import torch
import torch.distributed as dist


def main(mode: str, kind: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.accelerator.device_count = lambda: 1  # diffusers takes rank % device_count; a CPU has none
    from diffusers import ContextParallelConfig

    from qkernels.attention.diffusers_plugin import QKernelsQwenAttnProcessor, set_attention
    from qpipeline.demo import build_demo_transformer, demo_inputs

    m = build_demo_transformer("tiny", num_layers=1, attention_head_dim=64, num_attention_heads=2,
                               axes_dims_rope=(16, 24, 24))
    inp = demo_inputs(m, image_hw=(8, 8), text_tokens=16)
    inp["encoder_hidden_states_mask"] = None
    set_attention(m, mode)
    with torch.no_grad():
        ref = m(**inp)[0]
    cfg = ContextParallelConfig(ulysses_degree=world) if kind == "ulysses" else ContextParallelConfig(ring_degree=world)
    m.enable_parallelism(config=cfg)
    proc = m.transformer_blocks[0].attn.processor
    assert isinstance(proc, QKernelsQwenAttnProcessor) and proc._parallel_config is not None
    try:
        with torch.no_grad():
            out = m(**inp)[0]
        msg = f"ok rel_error={((out.float() - ref.float()).norm() / ref.float().norm()).item():.3e}"
    except Exception as exc:
        msg = f"error {type(exc).__name__}: {exc}"
    if rank == 0:
        print(f"RESULT {mode} {kind} {msg}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
