"""Real-time stream editing: camera frames in, edited frames out, one prompt for the stream.

    editor = StreamEditor(engine, "make it snow", steps=2, size=256)
    with editor:                                   # starts the worker thread
        editor.submit(frame)                       # never blocks; latest frame wins
        for result in editor.results():            # StreamResult: seq, image, timestamps
            show(result.image)

``submit`` hands a frame to one waiting slot: a frame that arrives while the worker is busy
replaces the one waiting there (``stats["dropped"]`` counts them), so there is never a backlog
and results come in submission order with gaps, never reordered. ``asubmit`` / ``aresults`` are
the asyncio forms. ``process(frame)`` / ``flush()`` run the same work inline (no thread).

The loop is this module's own, over the pipeline's components (the Qwen-Image-Edit pipeline's
arithmetic, step by step): ``encode_prompt`` (Qwen2.5-VL sees the frame), the VAE encode of the
frame into reference latents, the transformer on ``cat(latents, reference latents)`` with a
per-row timestep, the flow-match Euler step ``x + (sigma_next - sigma) * v`` in float32 per row,
the VAE decode. With the stream's defaults and a frame of exactly ``size`` px, the plain loop's
image equals ``Engine.generate([frame], prompt, num_steps=steps, seed=seed, height=size,
width=size)`` when the pipeline's reference resize target is ``size**2`` px
(tests/test_stream.py checks it bit for bit).

Modes:
* ``batch=False``: the plain loop, one frame through all its steps (the baseline).
* ``batch=True`` (stream batch, StreamDiffusion's idea for an edit model): frame t at step k and
  frame t+1 at step k-1 run as rows of one transformer forward, so with ``steps = n`` a full
  pipeline advances n frames per forward and a frame comes out every forward. Each row carries
  its own latent, timestep, VLM embedding (padded to the longest, padding masked) and reference
  tokens. A frame's result comes ``n`` forwards after it entered. When no frame is waiting the
  rows in flight still advance (a flush forward), so a slow camera adds no latency.

Reuse and skipping (each an option):
* similar-frame skip: the frame is compared with the last processed one on a 32x32 area-downscaled
  copy, on the device: ``similarity = 1 - mean|a - b| / 2`` over pixels in [-1, 1] (1.0: the same
  frame). Above ``threshold`` it is skipped with probability ``(similarity - threshold) /
  (1 - threshold)`` (StreamDiffusion's stochastic similarity filter), and after ``max_skip``
  consecutive skips a frame is processed anyway, so a still scene refreshes now and then. A
  skipped frame's result is the last result's image itself (``skipped=True``); ``threshold=None``
  turns skipping off.
* VLM embedding reuse: ``encode_prompt`` runs for a frame when ``vlm_every`` frames have been
  processed since the last encode (``None``: once per stream) or when the frame's similarity to
  the frame last encoded drops below ``vlm_threshold``.
* one noise tensor per stream (``seed``), so a still camera gives a still output.
* ``blend=s`` in (0, 1): a frame starts from ``sigma0 * noise + (1 - sigma0) * x_ref`` at the
  schedule ``linspace(1 - s, (1 - s) / n, n)`` (then shifted as the pipeline shifts), where
  ``x_ref`` is the mean of the last result's latent and the new frame's latent: a small motion
  gives a small change. The first frame (no result yet) runs the full schedule. With stream batch,
  the "last result" is the newest finished one, ``steps - 1`` frames older than in the plain loop.
* on CUDA, a frame's upload, similarity, VLM and VAE encode run on a second CUDA stream while the
  previous forward is still on the GPU, and a finished frame's VAE decode is queued on a third and
  read back after the next forward is queued (so it overlaps that forward; when nothing is in
  flight it is read at once). The decode has its own stream because the similarity is read on the
  host: behind a decode that waits for the forward, that read waited for the forward too (run 10:
  ~250 ms of host time a tick, the fused + graphs forward's whole GPU time). Streams are ordered
  with ``wait_stream`` and ``record_stream``. On the CPU the same code runs in order.

Every tick holds the engine's lock, so a stream and the server's HTTP edits interleave per
forward on one engine. Nothing here is CUDA-graph or compile specific: a transformer prepared by
``fuse_model`` / ``enable_cuda_graphs`` runs as it is (a graph per row count).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qkernels.errors import InputError

from .engine_features import pad_pair

__all__ = ["StreamEditor", "StreamResult", "StreamClosed"]

SIMILARITY_SIDE = 32  # px of the downscaled copy the similarity is computed on
# The stages whose host time ``report()`` gives per tick: the frame's preprocessing, upload and
# similarity (one host sync); the VLM encode; the VAE encode; the transformer forward(s) and Euler
# steps; queueing the VAE decode; reading decoded images back (waits for the decode).
STAGES = ("prepare", "vlm", "vae_encode", "forward", "decode", "finish")


class StreamClosed(Exception):
    """The stream was closed: ``results()`` ends, ``submit`` refuses."""


@dataclass
class StreamResult:
    """One answered frame. Times are ``time.monotonic()`` seconds.

    ``seq``: the frame's sequence number (0, 1, ... in submission order, dropped ones included).
    ``source_seq``: the frame whose computation made ``image`` (``seq`` itself unless skipped).
    ``t_in``: submit; ``t_start``: taken by the worker; ``t_out``: the image was ready.
    """

    seq: int
    image: object
    t_in: float
    t_start: float
    t_out: float
    skipped: bool = False
    source_seq: int = -1
    similarity: float | None = None
    encoded: bool = False  # the VLM embedding was computed for this frame
    tag: object = None  # what submit() was given with the frame
    latent: torch.Tensor | None = field(default=None, repr=False)  # packed output latent

    @property
    def latency_ms(self) -> float:
        return (self.t_out - self.t_in) * 1e3


@dataclass
class _Row:
    """A frame in flight: its latent, its own schedule position and its conditioning."""

    seq: int
    t_in: float
    t_start: float
    latents: torch.Tensor  # [1, L, C] packed
    image_latents: torch.Tensor  # [1, L_ref, C] packed reference tokens
    embeds: torch.Tensor  # [1, T, D]
    mask: torch.Tensor | None  # [1, T] or None (all valid)
    timesteps: torch.Tensor  # [n]
    sigmas: torch.Tensor  # [n + 1]
    similarity: float | None
    encoded: bool
    tag: object = None
    step: int = 0


def _check_int(name, v, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InputError(f"{name} must be an integer {rng}, got {v!r}")
    return v


def _check_float(name, v, lo, hi, *, lo_open=False, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise InputError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                         f"got {v!r}")
    return float(v)


class StreamEditor:
    """See the module docstring.

    ``engine``: a qpipeline ``Engine`` (loaded on first use). ``size``: output side in px, a
    multiple of 16 (VAE /8 x 2x2 packing). ``reference_size``: side of the frame the VAE encodes
    as reference tokens (default ``size``). ``output``: "pil" or "np" (float32 [H, W, 3] in [0, 1]).
    """

    def __init__(self, engine, prompt: str, steps: int = 2, size: int = 256, *, seed: int = 0, batch: bool = True,
                 threshold: float | None = 0.98, max_skip: int = 10, vlm_every: int | None = 8,
                 vlm_threshold: float = 0.95, blend: float = 0.0, reference_size: int | None = None,
                 output: str = "pil", keep_latents: bool = False):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt must be a non-empty string")
        self.steps = _check_int("steps", steps, 1, 50)
        self.size = _check_int("size", size, 16)
        if size % 16:
            raise InputError(f"size must be a multiple of 16 (VAE /8 x 2x2 latent packing), got {size}")
        reference_size = size if reference_size is None else reference_size
        self.reference_size = _check_int("reference_size", reference_size, 16)
        if reference_size % 16:
            raise InputError(f"reference_size must be a multiple of 16, got {reference_size}")
        self.seed = _check_int("seed", seed, 0, 2**63 - 1)
        self.threshold = None if threshold is None else _check_float("threshold", threshold, 0.0, 1.0, hi_open=True)
        self.max_skip = _check_int("max_skip", max_skip, 0)
        self.vlm_every = None if vlm_every is None else _check_int("vlm_every", vlm_every, 1)
        self.vlm_threshold = _check_float("vlm_threshold", vlm_threshold, 0.0, 1.0)
        self.blend = _check_float("blend", blend, 0.0, 1.0, hi_open=True)
        if self.blend and self.reference_size != self.size:
            raise InputError("blend needs reference_size == size: the frame's latent is blended with the output's")
        if output not in ("pil", "np"):
            raise InputError(f"output must be 'pil' or 'np', got {output!r}")
        self.engine, self.prompt, self.batch, self.output = engine, prompt, bool(batch), output
        self.keep_latents = bool(keep_latents)
        self._rng = random.Random(seed)
        self._ready = False
        self._rows: list[_Row] = []
        self._ghosts: list[tuple] = []  # skipped frames waiting for the frames before them
        self._pending: list[tuple] = []  # (row, decoded tensor) whose image is read next tick (CUDA)
        self._last: StreamResult | None = None  # newest result computed (not skipped)
        self._last_frame_small = None  # downscaled copy of the last processed frame
        self._embed_small = None  # ... of the frame the embedding was computed from
        self._embedding = None  # (embeds, mask)
        self._since_encode = 0
        self._skips_in_row = 0
        self._seq = 0
        self.stats = dict(submitted=0, dropped=0, skipped=0, processed=0, results=0, forwards=0, rows=0, encodes=0,
                          ticks=0)
        self.host_s = dict.fromkeys(STAGES, 0.0)  # host seconds per stage, summed over the ticks
        # threaded front
        self._cond = threading.Condition()
        self._waiting = None  # (seq, frame, t_in): the one slot
        self._out: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._abort = False
        self.error: BaseException | None = None

    # --- setup ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        if self._ready:
            return
        engine = self.engine
        pipe = engine.pipeline
        if pipe is None:
            raise InputError("the engine was unloaded while its stream ran")
        self.pipe, self.device = pipe, torch.device(engine.device)
        tr = pipe.transformer
        if tr.config.guidance_embeds:
            raise InputError("a guidance-distilled transformer needs guidance_scale; the stream does not support it")
        if pipe.scheduler.config.get("stochastic_sampling", False):
            raise InputError("the scheduler samples stochastically; the stream's Euler step is the deterministic one")
        self.dtype = tr.dtype if not hasattr(pipe.text_encoder, "dtype") else pipe.text_encoder.dtype
        self.vsf = pipe.vae_scale_factor
        self.channels = tr.config.in_channels // 4
        side = 2 * (self.size // (self.vsf * 2))
        rside = 2 * (self.reference_size // (self.vsf * 2))
        self.latent_side, self.ref_side = side, rside
        self.img_shapes = [(1, side // 2, side // 2), (1, rside // 2, rside // 2)]
        self.n_tokens = (side // 2) ** 2
        # One noise tensor per stream, drawn as the pipeline draws it (CPU generator, then moved),
        # so a frame of the plain loop equals Engine.generate with the same seed.
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, 1, self.channels, side, side)
        noise = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(self.seed), device=self.device,
                             dtype=self.dtype)
        self.noise = pipe._pack_latents(noise, 1, self.channels, side, side)
        self.schedule_full = self._schedule(1.0)
        self.schedule_blend = self._schedule(1.0 - self.blend) if self.blend else None
        cuda = self.device.type == "cuda"
        # Two side streams: frames in (upload, similarity, VLM and VAE encode) and images out (VAE
        # decode, read-back). Apart, the similarity's host sync waits only for the last encode, not
        # for a decode queued behind the forward still on the GPU.
        self._side = torch.cuda.Stream(self.device) if cuda else None
        self._out_stream = torch.cuda.Stream(self.device) if cuda else None
        vae = pipe.vae
        z = vae.config.z_dim
        self._latents_mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(self.device, vae.dtype)
        self._latents_inv_std = (1.0 / torch.tensor(vae.config.latents_std)).view(1, z, 1, 1, 1).to(self.device,
                                                                                                   vae.dtype)
        self._ready = True

    def _schedule(self, top: float):
        """(timesteps [n], sigmas [n+1]) of the pipeline's schedule from sigma ``top`` (shifted by
        ``mu`` for this token count as the pipeline does), on a private copy of the scheduler."""
        import numpy as np
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        n = self.steps
        sigmas = np.linspace(top, top / n, n)
        c = sched.config
        mu = calculate_shift(self.n_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sched.set_timesteps(n, device=self.device, sigmas=sigmas, mu=mu)
        return sched.timesteps, sched.sigmas.to(self.device)

    # --- per frame -----------------------------------------------------------------------------

    def _frame_images(self, frame):
        """(condition image for the VLM, VAE input [1, 3, 1, H, W] on the device) of a frame:
        center-cropped to a square, resized to ``reference_size`` (no-op when already that size),
        then the pipeline's own condition resize and VAE preprocess."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus
        from PIL import Image

        if not isinstance(frame, Image.Image):
            raise InputError(f"a frame must be a PIL image, got {type(frame).__name__}")
        image = frame.convert("RGB")
        w, h = image.size
        if w != h:
            s = min(w, h)
            image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if image.size != (self.reference_size, self.reference_size):
            image = image.resize((self.reference_size, self.reference_size), Image.Resampling.BICUBIC)
        proc = self.pipe.image_processor
        cw, ch = edit_plus.calculate_dimensions(edit_plus.CONDITION_IMAGE_SIZE, 1.0)
        cond = proc.resize(image, ch, cw)
        vae_in = proc.preprocess(image, self.reference_size, self.reference_size).unsqueeze(2)
        return cond, vae_in.to(self.device, self.dtype)

    @staticmethod
    def _small(vae_in):
        return F.interpolate(vae_in[:, :, 0].float(), size=(SIMILARITY_SIDE, SIMILARITY_SIDE), mode="area")

    @staticmethod
    def _similarity(a, b) -> float:
        return 1.0 - float((a - b).abs().mean()) / 2.0  # pixels in [-1, 1]: mean |a - b| <= 2

    @contextlib.contextmanager
    def _timed(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.host_s[stage] += time.perf_counter() - t0

    @staticmethod
    def _on(stream):
        """Run on ``stream`` (a side CUDA stream), or in order where there is none (the CPU)."""
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _encode_reference(self, vae_in):
        """Reference latents [1, L_ref, C] (the VAE's argmax, as the pipeline); runs on the stream
        current at the call (the side stream, in ``_step``)."""
        lat = self.pipe._encode_vae_image(vae_in, generator=None)
        r = self.ref_side
        return self.pipe._pack_latents(lat, 1, self.channels, r, r)

    def _decode_launch(self, latents):
        """Queue the VAE decode of finished latents on the output stream (after the forward that
        made them); the decoded [1, 3, H, W] tensor, still on the device. Nothing here waits on the
        host: the latents' statistics were put on the device once, in ``_setup``."""
        pipe = self.pipe
        if self._out_stream is not None:
            self._out_stream.wait_stream(torch.cuda.current_stream(self.device))
            latents.record_stream(self._out_stream)
        with self._on(self._out_stream):
            lat = pipe._unpack_latents(latents, self.size, self.size, self.vsf).to(pipe.vae.dtype)
            lat = lat / self._latents_inv_std + self._latents_mean  # the pipeline's arithmetic, op for op
            return pipe.vae.decode(lat, return_dict=False)[0][:, :, 0]

    def _decode_finish(self, image):
        with self._on(self._out_stream):  # its .cpu() waits for the output stream only
            return self.pipe.image_processor.postprocess(image, output_type=self.output)[0]

    def _admit(self, seq, frame, t_in, t_start, cond, vae_in, small, similarity) -> _Row:
        """A processed frame's row at step 0: embedding (reused or refreshed), reference latents,
        start latent."""
        pipe = self.pipe
        encoded = False
        refresh = (self._embedding is None
                   or (self.vlm_every is not None and self._since_encode >= self.vlm_every)
                   or self._similarity(small, self._embed_small) < self.vlm_threshold)
        if refresh:
            with self._timed("vlm"):
                embeds, mask = pipe.encode_prompt(prompt=self.prompt, image=[cond], device=self.device)
            self._embedding, self._embed_small, self._since_encode = (embeds, mask), small, 0
            self.stats["encodes"] += 1
            encoded = True
        self._since_encode += 1
        embeds, mask = self._embedding
        with self._timed("vae_encode"):
            image_latents = self._encode_reference(vae_in)
        timesteps, sigmas = self.schedule_full
        latents = self.noise
        if self.blend and self._last is not None and self._last.latent is not None:
            timesteps, sigmas = self.schedule_blend
            x_ref = 0.5 * (self._last.latent.float() + image_latents.float())
            s0 = sigmas[0].float()
            latents = (s0 * self.noise.float() + (1 - s0) * x_ref).to(self.dtype)
        self._last_frame_small = small
        self.stats["processed"] += 1
        return _Row(seq=seq, t_in=t_in, t_start=t_start, latents=latents, image_latents=image_latents, embeds=embeds,
                    mask=mask, timesteps=timesteps, sigmas=sigmas, similarity=similarity, encoded=encoded)

    def _forward(self, rows: list[_Row]) -> None:
        """One transformer forward over ``rows`` (each at its own step), then each row's Euler step."""
        pipe = self.pipe
        hidden = torch.cat([torch.cat([r.latents, r.image_latents], dim=1) for r in rows], dim=0)
        timestep = torch.stack([r.timesteps[r.step] for r in rows]).to(hidden.dtype)
        embeds, mask = pad_pair([r.embeds for r in rows], [r.mask for r in rows])
        with pipe.transformer.cache_context("cond"):
            out = pipe.transformer(hidden_states=hidden, timestep=timestep / 1000, guidance=None,
                                   encoder_hidden_states_mask=mask, encoder_hidden_states=embeds,
                                   img_shapes=[self.img_shapes] * len(rows), attention_kwargs={},
                                   return_dict=False)[0]
        for i, r in enumerate(rows):
            v = out[i:i + 1, : r.latents.shape[1]]
            dt = r.sigmas[r.step + 1] - r.sigmas[r.step]  # the scheduler's step, per row
            r.latents = (r.latents.to(torch.float32) + dt * v).to(v.dtype)
            r.step += 1
        self.stats["forwards"] += 1
        self.stats["rows"] += len(rows)

    def _finish(self, row: _Row, decoded) -> StreamResult:
        with self._timed("finish"):
            image = self._decode_finish(decoded)
        res = StreamResult(seq=row.seq, image=image, t_in=row.t_in, t_start=row.t_start, t_out=time.monotonic(),
                           source_seq=row.seq, similarity=row.similarity, encoded=row.encoded, tag=row.tag,
                           latent=row.latents if (self.blend or self.keep_latents) else None)
        self._last = res
        self.stats["results"] += 1
        return res

    def _skip(self, similarity: float) -> bool:
        if self.threshold is None or similarity is None or similarity <= self.threshold:
            self._skips_in_row = 0
            return False
        if self._skips_in_row >= self.max_skip:
            self._skips_in_row = 0
            return False  # the periodic refresh of a still scene
        if self._rng.random() < (similarity - self.threshold) / (1.0 - self.threshold):
            self._skips_in_row += 1
            return True
        self._skips_in_row = 0
        return False

    def _step(self, item) -> list[StreamResult]:
        """One tick: take ``item`` ((seq, frame, t_in) or None), run what it needs; the results
        that are ready, in sequence order."""
        if not self._ready and not self.engine.loaded:
            self.engine.load()  # takes the engine's lock itself: before the tick takes it
        lock = getattr(self.engine, "_lock", None)
        with lock if lock is not None else contextlib.nullcontext(), torch.inference_mode():
            self._setup()
            results = []
            row = None
            main = torch.cuda.current_stream(self.device) if self._side is not None else None
            if item is not None:
                seq, frame, t_in, tag = item
                t_start = time.monotonic()
                if main is not None and self.blend:
                    self._side.wait_stream(main)  # x_ref reads the last result's latent
                # On CUDA the frame's upload, similarity (its one host sync), VLM and VAE encode run
                # on the side stream, overlapping the previous forward still on the GPU.
                with self._on(self._side):
                    with self._timed("prepare"):
                        cond, vae_in = self._frame_images(frame)
                        small = self._small(vae_in)
                        similarity = None if self._last_frame_small is None else self._similarity(
                            small, self._last_frame_small)
                    if self._skip(similarity):
                        self.stats["skipped"] += 1
                        self._ghosts.append((seq, t_in, t_start, similarity, tag))
                    else:
                        row = self._admit(seq, frame, t_in, t_start, cond, vae_in, small, similarity)
                        row.tag = tag
                if main is not None and row is not None:
                    main.wait_stream(self._side)
                    for t in (row.latents, row.image_latents, row.embeds, row.mask):
                        if t is not None:
                            t.record_stream(main)
            if row is not None:
                self._rows.append(row)
            if self._rows:
                with self._timed("forward"):
                    if self.batch:
                        self._forward(self._rows)
                    else:
                        while self._rows[0].step < self.steps:
                            self._forward(self._rows)
            # the decodes queued last tick finish while this tick's forward runs
            results += [self._finish(r, d) for r, d in self._pending]
            self._pending = []
            done = [r for r in self._rows if r.step == self.steps]
            self._rows = [r for r in self._rows if r.step < self.steps]
            with self._timed("decode"):
                self._pending = [(r, self._decode_launch(r.latents)) for r in done]
            if main is None or not self._rows:  # nothing to overlap with: finish now
                results += [self._finish(r, d) for r, d in self._pending]
                self._pending = []
            # A skipped frame answers with the newest result once every frame before it is out,
            # so results never come out of sequence order.
            oldest = min([r.seq for r in self._rows] + [r.seq for r, _ in self._pending], default=math.inf)
            while self._ghosts and self._ghosts[0][0] < oldest:
                seq, t_in, t_start, similarity, tag = self._ghosts.pop(0)
                last = self._last
                results.append(StreamResult(seq=seq, image=last.image, t_in=t_in, t_start=t_start,
                                            t_out=time.monotonic(), skipped=True, source_seq=last.source_seq,
                                            similarity=similarity, tag=tag))
            results.sort(key=lambda r: r.seq)
            self.stats["ticks"] += 1
            return results

    # --- inline use ----------------------------------------------------------------------------

    def _next_seq(self, t_in=None):
        seq, self._seq = self._seq, self._seq + 1
        self.stats["submitted"] += 1
        return seq, (time.monotonic() if t_in is None else t_in)

    def process(self, frame, tag=None) -> list[StreamResult]:
        """Run ``frame`` now (no thread): the results ready after it (plain loop: this frame's;
        stream batch: the frame ``steps - 1`` earlier, or none while the pipeline fills)."""
        if self._thread is not None:
            raise InputError("this stream runs its worker thread; use submit()")
        seq, t_in = self._next_seq()
        return self._step((seq, frame, t_in, tag))

    def flush(self) -> list[StreamResult]:
        """Advance the frames still in flight until all are out (stream batch; the plain loop has none)."""
        out = []
        while self._rows or self._ghosts or self._pending:
            out += self._step(None)
        return out

    @property
    def in_flight(self) -> int:
        return len(self._rows)

    # --- threaded front ------------------------------------------------------------------------

    def start(self) -> "StreamEditor":
        with self._cond:
            if self._closed:
                raise StreamClosed("the stream is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="qpipeline-stream", daemon=True)
                self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def submit(self, frame, tag=None) -> int:
        """Queue ``frame`` (a PIL image) for the worker; its sequence number. Never blocks: a frame
        still waiting is replaced (dropped) by this one. ``tag`` comes back on its result."""
        from PIL import Image

        if not isinstance(frame, Image.Image):
            raise InputError(f"a frame must be a PIL image, got {type(frame).__name__}")
        self.start()
        with self._cond:
            if self._closed:
                raise StreamClosed("the stream is closed")
            seq, t_in = self._next_seq()
            if self._waiting is not None:
                self.stats["dropped"] += 1
            self._waiting = (seq, frame, t_in, tag)
            self._cond.notify()
        return seq

    async def asubmit(self, frame, tag=None) -> int:
        return self.submit(frame, tag)  # never blocks

    def results(self, timeout: float | None = None):
        """Results as they come, until the stream is closed and drained (or ``timeout`` s pass
        with none: ``queue.Empty``). Re-raises the worker's error, if it failed."""
        while True:
            item = self._out.get(timeout=timeout)
            if item is None:
                self._out.put(None)  # every reader sees the end
                if self.error is not None:
                    raise self.error
                return
            yield item

    def next_result(self, timeout: float | None = None) -> StreamResult:
        for r in self.results(timeout):
            return r
        raise StreamClosed("the stream is closed")

    async def aresults(self):
        """``results()`` for asyncio: the blocking get runs in a thread."""
        while True:
            item = await asyncio.to_thread(self._out.get)
            if item is None:
                self._out.put(None)
                if self.error is not None:
                    raise self.error
                return
            yield item

    def close(self, timeout: float | None = 30, drain: bool = True) -> None:
        """Stop taking frames; the worker finishes the frames in flight (``drain=False``: drops them
        and a frame still waiting after its current forward), then ``results()`` ends."""
        with self._cond:
            self._closed = True
            if not drain:
                self._abort = True
                self._waiting = None
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        elif self._thread is None:
            self._out.put(None)

    def _take(self):
        with self._cond:
            while self._waiting is None and not self._closed and not self._rows and not self._pending:
                self._cond.wait()
            item, self._waiting = self._waiting, None
            return item

    def _work(self) -> None:
        try:
            while True:
                item = self._take()
                if self._abort or (item is None and not self._rows and not self._ghosts and not self._pending):
                    return  # closed and drained
                for r in self._step(item):
                    self._out.put(r)
        except BaseException as e:  # noqa: BLE001 - the reader gets it from results()
            self.error = e
        finally:
            self._out.put(None)

    def report(self) -> dict:
        """Counters plus ``skip_rate`` (skipped / taken frames), ``rows_per_forward`` and
        ``host_ms_<stage>``: mean host milliseconds per tick in each of ``STAGES`` (on CUDA the
        launches, plus the waits at the two host syncs: the similarity and the image read-back)."""
        s = dict(self.stats)
        for stage, sec in self.host_s.items():
            s[f"host_ms_{stage}"] = 1e3 * sec / s["ticks"] if s["ticks"] else 0.0
        taken = s["processed"] + s["skipped"]
        s["skip_rate"] = s["skipped"] / taken if taken else 0.0
        s["rows_per_forward"] = s["rows"] / s["forwards"] if s["forwards"] else 0.0
        return s
