"""A drop-in engine around a diffusers image-edit pipeline (Qwen-Image-Edit 2509 / 2511) whose
transformer is quantized.

    engine = Engine("Qwen-Image-Edit-2511/", quantized="q/", lora="lightning-8step.safetensors")
    engine.load()                                   # prints the load time
    image = engine.generate([photo], "make it snow", num_steps=8, true_cfg_scale=1.0, seed=0)

Where the transformer comes from:
* ``quantized=<dir>`` (from ``save_quantized``): built on the meta device and assigned from the
  checkpoint straight onto ``device``; the pipeline folder's bf16 transformer is never read
  (it may be absent). A ``lora`` is attached as a run-time bf16 branch on each QuantLinear
  (a layer the checkpoint kept in bf16 gets it merged into its weight).
* otherwise: the bf16 transformer is assigned from ``model_dir/transformer`` on the CPU, a
  ``lora`` is merged into its bf16 weights in fp32 (the right place for an always-on Lightning
  LoRA), then ``quantize_model(..., device=device)`` quantizes and moves one layer at a time,
  so the device never holds a full bf16 copy. ``backend="bf16"`` skips quantization (the
  reference engine).

``model_dir`` may also be an already-built pipeline object (``Engine(pipe, backend=...)``, what
the full-size benchmark does): its transformer is quantized in place, one layer at a time, and its
components are used where they are; such an engine cannot load again after ``unload()``.

``generate`` calls are serialized by a lock, so one engine can sit behind a threaded web
server. After ``unload()`` the next ``generate`` loads again (and prints it).

Per call, ``engine.last_timings`` holds the ms of each stage (text/vision encode, reference VAE
encode, each denoising step, VAE decode, total; see ``engine_features``). Options, each off by
default and measured on and off by ``benchmarks.pipeline``:
* ``batched_cfg=True``: with ``true_cfg_scale > 1``, the cond and uncond transformer passes of a
  step run as one batch-2 forward (shorter prompt padded, its padding masked);
* ``embedding_cache=N`` (or True: 16): the text encoder's output for an unchanged prompt and
  unchanged input images is reused (content-hashed, LRU of N entries);
* ``offload=True``: diffusers' model CPU offload, each component moved onto the device for its
  stage only. With an fp8 transformer and ``quantize_text_encoder=True`` this is the 24 GB mode:
  ``Engine(dir, backend="fp8-scaled-mm", quantize_text_encoder=True, offload=True)``;
* ``fuse=True``: the quantized transformer's blocks rewired to the fused kernels
  (``qpipeline.blocks``; a block that cannot be fused stays as it is, ``engine.fuse_report``);
* ``cuda_graphs=True`` (CUDA only, not with offload): the block loop replayed from CUDA graphs,
  one per input shape (``qpipeline.graphs``; the first call of each shape captures it).
"""

from __future__ import annotations

import gc
import math
import threading
import time
from pathlib import Path

import torch

from qkernels import formats, list_backends
from qkernels.capabilities import device_reason, major_minor
from qkernels.errors import BackendUnavailableError, CheckpointError, InputError

from . import lora as qlora
from .engine_features import EmbeddingCache, instrument
from .checkpoint import load_pretrained, load_quantized
from .quantize import quantize_model
from .recipe import get_recipe

__all__ = ["Engine"]

LORA_NAME = "engine"


def _text_encoder_backends() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(weight-only, W8A8) names of the registered quantizing backends: weight-only upcasts per
    call (what the 24 GB mode quantizes on the CPU); W8A8 runs 8-bit GEMMs, quantized on the
    device (no upcast, but each Linear call also quantizes its input)."""
    acts = {b.name: formats.get_format(b.format).quantizes_activations
            for b in list_backends() if b.format in formats.FORMATS}
    return tuple(n for n, a in acts.items() if not a), tuple(n for n, a in acts.items() if a)


# Qwen-Image-Edit-2511's transformer (``zero_cond_t``) and QwenImageEditPlusPipeline need
# diffusers 0.37 (0.36 builds the transformer without it; 0.35 has no edit-plus pipeline).
DIFFUSERS_MIN_VERSION = (0, 37)


def _check_diffusers() -> None:
    try:
        import diffusers
    except ImportError as exc:
        raise InputError(f"the engine needs diffusers, which failed to import ({exc}): "
                         "pip install 'qkernels[engine]'") from exc
    if major_minor(getattr(diffusers, "__version__", "")) < DIFFUSERS_MIN_VERSION:
        need = ".".join(map(str, DIFFUSERS_MIN_VERSION))
        raise InputError(f"the engine needs diffusers >= {need} (Qwen-Image-Edit-2511's pipeline and transformer), "
                         f"found {getattr(diffusers, '__version__', 'unknown')}: pip install -U 'diffusers>={need}'")


class Engine:
    """Load once, generate many times. See the module docstring.

    ``backend``: ``auto``, ``bf16`` (no quantization) or any quantizing backend name; with
    ``quantized`` it picks the kernel for the checkpoint's format. ``recipe``: the rules used
    when quantizing at load (default ``qwen-image``: embedders, time embedding, ``norm_out``
    and ``proj_out`` stay bf16). ``quantize_text_encoder``: False, True (``int8-layerwise``),
    ``"fp8-layerwise"`` (weight-only 8-bit storage for the text encoder's Linear layers: half its
    memory, one upcast per layer call; it runs once per prompt, not per step) or any W8A8 backend
    (``"fp8-scaled-mm"``, ``"fp8-triton"``, ...: 8-bit GEMMs, not with ``offload``).
    ``attention``: None (the model's own), "int8-fp8" or "bf16": qkernels' processor for the
    transformer's joint attention, set after loading.
    """

    def __init__(self, model_dir, backend: str = "auto", quantized=None, lora=None, lora_scale: float = 1.0,
                 device=None, quantize_text_encoder: bool | str = False, *, recipe: str = "qwen-image",
                 dtype: torch.dtype = torch.bfloat16, attention: str | None = None, batched_cfg: bool = False,
                 embedding_cache: int | bool = 0, offload: bool = False, fuse: bool = False,
                 cuda_graphs: bool = False):
        self._given = None  # a pipeline object passed instead of a folder
        if hasattr(model_dir, "transformer") and callable(model_dir):
            self._given, self.model_dir = model_dir, None
            if quantized is not None or lora is not None:
                raise InputError("quantized= and lora= need a pipeline folder, not a pipeline object")
        else:
            self.model_dir = Path(model_dir)
            if not (self.model_dir / "model_index.json").is_file():
                raise CheckpointError(f"{self.model_dir} is not a diffusers pipeline folder (no model_index.json)")
        if quantized is not None and not Path(quantized).is_dir():
            raise CheckpointError(f"quantized checkpoint folder {quantized} does not exist")
        if quantized is not None and backend == "bf16":
            raise InputError("backend 'bf16' computes unquantized weights; it cannot run a quantized checkpoint")
        if quantize_text_encoder is True:
            quantize_text_encoder = "int8-layerwise"
        weight_only, w8a8 = _text_encoder_backends()
        if quantize_text_encoder and quantize_text_encoder not in weight_only + w8a8:
            raise InputError(f"quantize_text_encoder must be False, True or one of {', '.join(weight_only + w8a8)}, "
                             f"got {quantize_text_encoder!r}")
        if offload and quantize_text_encoder and quantize_text_encoder not in weight_only:
            raise InputError(f"offload=True quantizes the text encoder on the CPU, where {quantize_text_encoder!r} "
                             f"cannot run: use one of {', '.join(weight_only)}")
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if reason := device_reason(device):  # now, not as an AssertionError deep inside load()
            raise BackendUnavailableError(f"Engine(device={str(device)!r}): {reason}")
        from qkernels.attention import MODES as attention_modes

        if attention is not None and attention not in attention_modes:
            raise InputError(f"attention must be None or one of {', '.join(attention_modes)}, got {attention!r}")
        self.attention = attention
        if fuse and backend == "bf16":
            raise InputError("fuse=True rewires quantized blocks; backend 'bf16' has none")
        if cuda_graphs and device.type != "cuda":
            raise BackendUnavailableError(f"cuda_graphs=True needs a CUDA device, the engine runs on {device}")
        if cuda_graphs and offload:
            raise InputError("cuda_graphs=True and offload=True do not mix: a captured graph holds the "
                             "transformer's device memory while offload moves it away")
        self.fuse, self.cuda_graphs = bool(fuse), bool(cuda_graphs)
        self.fuse_report = None
        self.backend, self.recipe, self.dtype = backend, recipe, dtype
        self.quantized = Path(quantized) if quantized is not None else None
        self.lora_scale = qlora._finite_scale(lora_scale, "lora_scale")
        self.lora = qlora._as_lora(lora) if lora is not None else None  # read and checked now, not mid-load
        self.device = device
        self.text_encoder_backend = quantize_text_encoder or None
        self.pipeline = None
        self.report = None  # QuantReport of the transformer when quantized at load
        self.text_encoder_report = None
        self.lora_layers: dict[str, list[str]] = {}
        self.load_count = 0
        self.load_seconds: float | None = None
        self.batched_cfg, self.offload = bool(batched_cfg), bool(offload)
        if embedding_cache is True:
            embedding_cache = 16
        self.embedding_cache = EmbeddingCache(embedding_cache) if embedding_cache else None
        self.last_timings: dict | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.pipeline is not None

    @property
    def transformer(self):
        return None if self.pipeline is None else self.pipeline.transformer

    def load(self) -> "Engine":
        """Build the pipeline on ``device``; a no-op when already loaded."""
        with self._lock:
            self._load()
        return self

    def _load(self) -> None:
        if self.pipeline is not None:
            return
        _check_diffusers()
        if self.embedding_cache is not None:
            self.embedding_cache.clear()  # entries belong to the text encoder they came from
        if self.model_dir is None:
            self._adopt()
            return
        from diffusers import DiffusionPipeline

        t0 = time.perf_counter()
        transformer = self._load_transformer()
        if self.attention is not None:
            from qkernels.attention.diffusers_plugin import set_attention

            set_attention(transformer, self.attention)
        t_transformer = time.perf_counter() - t0
        # Every other component from the pipeline folder; transformer=None: its weights are not read.
        pipe = DiffusionPipeline.from_pretrained(str(self.model_dir), transformer=None, torch_dtype=self.dtype,
                                                 local_files_only=True)
        if self.text_encoder_backend:
            # With offload, quantized on the CPU: the device already holds the transformer, and
            # the text encoder's bf16 layers passing through it would add to that peak.
            te_device = "cpu" if self.offload else self.device
            self.text_encoder_report = quantize_model(pipe.text_encoder, self.text_encoder_backend, device=te_device)
        if not self.offload:
            for name in ("text_encoder", "vae"):
                getattr(pipe, name).to(self.device)
        pipe.register_modules(transformer=transformer)
        self._finish(pipe)
        self.load_count += 1
        self.load_seconds = time.perf_counter() - t0
        what = ("bf16" if self.backend == "bf16" else
                f"from {self.quantized}" if self.quantized else f"quantized at load ({self.backend})")
        print(f"engine: loaded in {self.load_seconds:.2f} s on {self.device} "
              f"(transformer {what}: {t_transformer:.2f} s)", flush=True)

    def _finish(self, pipe) -> None:
        if self.fuse and self.fuse_report is None:  # a loaded checkpoint's report, else fuse here
            from .blocks import fuse_model

            self.fuse_report = fuse_model(pipe.transformer)
        if self.cuda_graphs:
            from .graphs import enable_cuda_graphs

            enable_cuda_graphs(pipe.transformer)
        if self.offload:
            # Moves every component to the CPU; each comes onto the device for its stage only.
            # QuantLinear moves its 8-bit tensors like any buffer and keeps their dtype.
            pipe.enable_model_cpu_offload(device=self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipeline = pipe

    def _adopt(self) -> None:
        """Take a pipeline object as the engine's: quantize its transformer (and text encoder)
        in place unless already quantized, then place it as ``_load`` would."""
        from qkernels import QuantLinear

        pipe = self._given
        if pipe is None:
            raise InputError("this engine was built from a pipeline object and was unloaded; build a new one")
        t0 = time.perf_counter()
        has_quant = any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
        if self.backend == "bf16" and has_quant:
            raise InputError("backend 'bf16' given, but this pipeline's transformer is already quantized")
        if self.backend != "bf16" and not has_quant:
            recipe = get_recipe(self.recipe).replace(backend=self.backend)
            self.report = quantize_model(pipe.transformer, recipe, device=self.device)
        if self.text_encoder_backend and not any(isinstance(m, QuantLinear) for m in pipe.text_encoder.modules()):
            self.text_encoder_report = quantize_model(pipe.text_encoder, self.text_encoder_backend, device=self.device)
        if self.attention is not None:
            from qkernels.attention.diffusers_plugin import set_attention

            set_attention(pipe.transformer, self.attention)
        if not self.offload:
            pipe.to(self.device)
        self._finish(pipe)
        self.load_count += 1
        self.load_seconds = time.perf_counter() - t0
        print(f"engine: took a built pipeline in {self.load_seconds:.2f} s on {self.device} "
              f"(transformer {'bf16' if self.backend == 'bf16' else 'quantized'}"
              f"{', offload' if self.offload else ''})", flush=True)

    def _load_transformer(self):
        if self.quantized is not None:
            model = load_quantized(self.quantized, device=self.device, backend=self.backend,
                                   fuse=False if self.lora is not None else (True if self.fuse else None))
            self.fuse_report = getattr(model, "fuse_report", None)
            if self.lora is not None:
                self.lora_layers = qlora.apply_runtime(model, self.lora, self.lora_scale, name=LORA_NAME)
            return model
        # bf16 weights assigned from the files on the CPU (built on meta: one copy, no fp32 pass)
        model = load_pretrained(self.model_dir, dtype=self.dtype)
        if self.lora is not None:
            self.lora_layers = {"runtime": [], "merged": qlora.merge(model, self.lora, self.lora_scale)}
        if self.backend == "bf16":
            return model.to(self.device)
        recipe = get_recipe(self.recipe).replace(backend=self.backend)
        self.report = quantize_model(model, recipe, device=self.device)
        return model

    def unload(self) -> None:
        """Drop the pipeline and free its memory: the device's (CUDA caching allocator emptied)
        and the process's (heap pages handed back to the OS). A later ``generate`` loads again."""
        with self._lock:
            self.pipeline = self._given = None
            self.fuse_report = None
            self.report = self.text_encoder_report = None
            self.last_timings = None
            if self.embedding_cache is not None:
                self.embedding_cache.clear()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            _trim_heap()

    # ------------------------------------------------------------------------------------------

    def generate(self, images, prompt: str, num_steps: int = 8, true_cfg_scale: float = 1.0, seed: int = 0,
                 height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                 output_type: str = "pil"):
        """One edited image (PIL) from reference ``images`` (a PIL image or a list) and ``prompt``.

        ``output_type="np"`` returns the decoded float32 [H, W, 3] array in [0, 1] instead (what
        accuracy comparisons should use: the PIL image's 8-bit rounding floors PSNR near 48 dB).
        ``seed`` drives a CPU generator, so the same seed gives the same initial noise on any
        device. ``true_cfg_scale > 1`` runs classifier-free guidance (two transformer passes per
        step) with ``negative_prompt`` (default " "); Lightning LoRAs use 1.0.
        """
        from PIL import Image

        images = [images] if isinstance(images, Image.Image) else list(images or [])
        if not images or not all(isinstance(i, Image.Image) for i in images):
            raise InputError("images must be a PIL image or a non-empty list of PIL images")
        if not isinstance(prompt, str) or not prompt:
            raise InputError("prompt must be a non-empty string")
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise InputError(f"num_steps must be a positive integer, got {num_steps!r}")
        for what, v in (("height", height), ("width", width)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 16):
                raise InputError(f"{what} must be None or an integer >= 16 (pixels), got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise InputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if isinstance(true_cfg_scale, bool) or not isinstance(true_cfg_scale, (int, float)) \
                or not math.isfinite(true_cfg_scale) or true_cfg_scale < 0:
            raise InputError(f"true_cfg_scale must be a finite number >= 0, got {true_cfg_scale!r}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise InputError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
        with self._lock:
            self._load()
            extra = {}
            if true_cfg_scale > 1:
                extra["negative_prompt"] = negative_prompt if negative_prompt is not None else " "
            pipe = self.pipeline
            with torch.inference_mode(), instrument(pipe, self.device, cache=self.embedding_cache,
                                                    batched_cfg=self.batched_cfg) as record:
                out = pipe(
                    image=[i.convert("RGB") for i in images], prompt=prompt, num_inference_steps=num_steps,
                    true_cfg_scale=true_cfg_scale, height=height, width=width,
                    generator=torch.Generator(device="cpu").manual_seed(seed), output_type=output_type,
                    callback_on_step_end=record.step_end, callback_on_step_end_tensor_inputs=[], **extra,
                )
            self.last_timings = record.timings()
            return out.images[0]


def _trim_heap() -> None:
    """Return freed heap pages to the OS. glibc keeps the arenas of freed tensors mapped: after
    unloading the tiny pipeline widened to hidden 1024 (540 MB loaded on CPU), RSS stayed 444 MB
    over its pre-load 497 MB until ``malloc_trim(0)``, then 4 MB over. Not glibc: nothing to do."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        pass
