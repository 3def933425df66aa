"""What ``Engine.generate`` adds around one diffusers edit-pipeline call: per-stage timings, an
embedding cache, and batched classifier-free guidance.

All three hook the pipeline's own calls for the length of one ``__call__`` (``instrument``) and
change none of its code: ``pipe.encode_prompt``, ``pipe.vae.encode`` / ``pipe.vae.decode`` and
``pipe.transformer.forward`` are wrapped as instance attributes and put back afterwards, and the
step boundaries come from the pipeline's ``callback_on_step_end``. Installing and removing the
wrappers is a few attribute writes per image (microseconds against seconds).

Timings (``StageTimer``): CUDA events on a GPU, ``time.perf_counter`` on a CPU; nothing
synchronizes until the call has returned (the pipeline's own ``.cpu()`` of the decoded image has
synchronized by then), when the events are read once.

Batched CFG (``CFGBatcher``): the edit pipeline calls the transformer twice per step with true
CFG, first with the prompt's embeddings, then with the negative prompt's, on the same latent
input. The batcher recognizes the pair by identity (the embedding tensors that ``encode_prompt``
returned in this call, in that order, and the same ``hidden_states`` object), runs one batch-2
forward at the first call, returns its cond half and hands the uncond half to the second call.
The shorter prompt is zero-padded to the longer one and ``encoder_hidden_states_mask`` marks the
padding, which the transformer's joint attention masks out (diffusers >= 0.36; text RoPE
positions are those of the unpadded prompt, a prefix of the longer one's). Any call it does not
recognize (a callback that replaced the embeddings, positional arguments) runs unchanged.

Embedding cache (``EmbeddingCache``): ``encode_prompt``'s output keyed by a sha256 of the prompt
and of the pixels of the condition images the text encoder would see, bounded LRU.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import OrderedDict

import torch

from qkernels.errors import InputError

__all__ = ["StageTimer", "EmbeddingCache", "CFGBatcher", "instrument"]


# --------------------------------------------------------------------------------------------
# timings


class StageTimer:
    """Marks on one clock; durations are read once, in ``result()``.

    ``begin(stage)`` / ``end(stage)`` bracket a stage (a stage that runs twice, like the cond and
    negative prompt encodes, is summed); ``step_end()`` closes one denoising step, whose start is
    the previous step's end or, for the first step, the first transformer call (the ``torch.cat``
    of latents before it is microseconds).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._marks: list[tuple[str, str, object]] = []  # (kind, stage, event or seconds)
        self._first_forward = None

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record(torch.cuda.current_stream(self.device))
            return e
        return time.perf_counter()

    def begin(self, stage: str) -> None:
        self._marks.append(("begin", stage, self._now()))

    def end(self, stage: str) -> None:
        self._marks.append(("end", stage, self._now()))

    def transformer_call(self) -> None:
        if self._first_forward is None:
            self._first_forward = self._now()
            self._marks.append(("denoise-start", "", self._first_forward))

    def step_end(self) -> None:
        self._marks.append(("step", "", self._now()))

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def result(self) -> dict:
        """{stage}_ms sums, ``step_ms`` (one per step), ``denoise_ms``, ``total_ms`` and
        ``other_ms`` (total minus the named stages: preprocessing, latent prep, postprocessing)."""
        if self.cuda and self._marks:
            self._marks[-1][2].synchronize()  # the one wait: every earlier event is complete too
        sums: dict[str, float] = {}
        open_: dict[str, object] = {}
        steps: list[float] = []
        last_step = None
        total_begin = total_end = None
        for kind, stage, t in self._marks:
            if kind == "begin":
                open_[stage] = t
                if stage == "total":
                    total_begin = t
            elif kind == "end":
                if stage == "total":
                    total_end = t
                elif stage in open_:
                    sums[stage] = sums.get(stage, 0.0) + self._ms(open_.pop(stage), t)
            elif kind == "denoise-start":
                last_step = t
            elif kind == "step" and last_step is not None:
                steps.append(self._ms(last_step, t))
                last_step = t
        out = {"clock": "cuda-events" if self.cuda else "perf_counter"}
        for stage in ("encode", "vae_encode", "decode"):
            out[f"{stage}_ms"] = sums.get(stage, 0.0)
        out["step_ms"] = steps
        out["denoise_ms"] = sum(steps)
        if total_begin is not None and total_end is not None:
            out["total_ms"] = self._ms(total_begin, total_end)
            out["other_ms"] = out["total_ms"] - out["denoise_ms"] - sum(out[f"{s}_ms"] for s in
                                                                         ("encode", "vae_encode", "decode"))
        return out


# --------------------------------------------------------------------------------------------
# embedding cache


def _image_digest(h, image) -> None:
    from PIL import Image

    if isinstance(image, Image.Image):
        h.update(f"pil:{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    elif isinstance(image, torch.Tensor):
        t = image.detach().contiguous().cpu()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        import numpy as np

        a = np.ascontiguousarray(np.asarray(image))
        h.update(f"array:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())


def embedding_key(prompt, images, **extra) -> str:
    """sha256 of the prompt, the images' pixels (mode and size included) and ``extra``.

    A 384x384 RGB condition image is 442 KB: ~0.3 ms of hashing, against a text-encoder pass of
    tens of ms on a GPU."""
    h = hashlib.sha256()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    for p in prompts:
        b = p.encode()
        h.update(len(b).to_bytes(8, "little") + b)
    imgs = images if isinstance(images, (list, tuple)) else ([] if images is None else [images])
    h.update(f"n={len(imgs)}".encode())
    for im in imgs:
        _image_digest(h, im)
    h.update(repr(sorted(extra.items())).encode())
    return h.hexdigest()


class EmbeddingCache:
    """Bounded LRU of ``encode_prompt`` results: key -> (prompt_embeds, prompt_embeds_mask).

    ``max_entries`` (default 16): one entry is ``tokens x 3584`` bf16 on the device, ~2 MB for a
    prompt with one 384^2 condition image (~500 tokens), ~6 MB with three, so 16 entries stay
    under 100 MB of GPU memory. The cached tensors are returned as they are (the pipeline only
    reads them); callers must not modify them in place.
    """

    def __init__(self, max_entries: int = 16):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise InputError(f"embedding cache max_entries must be a positive integer, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str):
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: tuple) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# --------------------------------------------------------------------------------------------
# batched CFG


def pad_pair(embeds, masks):
    """Two [1, L_i, D] embeddings (and their masks or None) -> [2, L, D] zero-padded and a [2, L]
    bool mask, or None when both are full length with no mask (no padding: the transformer's
    attention then runs without one, as in the sequential case)."""
    lengths = [e.shape[1] for e in embeds]
    L = max(lengths)
    if all(n == L for n in lengths) and all(m is None for m in masks):
        return torch.cat(embeds, dim=0), None
    padded, mask_rows = [], []
    for e, m, n in zip(embeds, masks, lengths):
        row = torch.ones(e.shape[0], n, dtype=torch.bool, device=e.device) if m is None else m.to(torch.bool)
        if n < L:
            e = torch.cat([e, e.new_zeros(e.shape[0], L - n, e.shape[2])], dim=1)
            row = torch.cat([row, row.new_zeros(row.shape[0], L - n)], dim=1)
        padded.append(e)
        mask_rows.append(row)
    return torch.cat(padded, dim=0), torch.cat(mask_rows, dim=0)


class CFGBatcher:
    """See the module docstring. One instance per pipeline call."""

    def __init__(self):
        self.prompts: list[tuple] = []  # (embeds, mask) as encode_prompt returned them, in order
        self._pending = None  # (hidden_states, uncond output) waiting for the uncond call
        self.batched_calls = self.plain_calls = 0

    def encoded(self, embeds, mask) -> None:
        self.prompts.append((embeds, mask))

    def forward(self, forward, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states")
        hs = kwargs.get("hidden_states")
        if not args and len(self.prompts) == 2 and hs is not None and ehs is not None:
            (cond, cond_mask), (neg, neg_mask) = self.prompts
            if ehs is cond and hs.shape[0] == 1:
                return self._batched(forward, kwargs, (cond, neg), (cond_mask, neg_mask))
            if ehs is neg and self._pending is not None and self._pending[0] is hs:
                out = self._pending[1]
                self._pending = None
                return self._wrap(out, kwargs)
        self.plain_calls += 1
        return forward(*args, **kwargs)

    def _batched(self, forward, kwargs, embeds, masks):
        ehs, mask = pad_pair(embeds, masks)
        hs = kwargs["hidden_states"]
        kw = dict(kwargs, hidden_states=torch.cat([hs, hs], dim=0), encoder_hidden_states=ehs,
                  encoder_hidden_states_mask=mask, return_dict=False)
        t = kw.get("timestep")
        if isinstance(t, torch.Tensor) and t.ndim == 1 and t.shape[0] == 1:
            kw["timestep"] = t.expand(2)
        g = kw.get("guidance")
        if isinstance(g, torch.Tensor) and g.ndim == 1 and g.shape[0] == 1:
            kw["guidance"] = g.expand(2)
        if kw.get("img_shapes") is not None:
            kw["img_shapes"] = list(kw["img_shapes"]) * 2
        out = forward(**kw)[0]
        self._pending = (hs, out[1:])
        self.batched_calls += 1
        return self._wrap(out[:1], kwargs)

    @staticmethod
    def _wrap(sample, kwargs):
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)


# --------------------------------------------------------------------------------------------
# the per-call wrappers


@contextlib.contextmanager
def _patched(obj, name: str, make):
    """Set ``obj.name = make(current)`` for the block; afterwards remove it only if it is still
    ours (model CPU offload re-installs its own ``forward`` at the end of a pipeline call, and
    that one must stay)."""
    current = getattr(obj, name)
    had_own = name in obj.__dict__
    previous = obj.__dict__.get(name)
    wrapper = make(current)
    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        if obj.__dict__.get(name) is wrapper:
            if had_own:
                setattr(obj, name, previous)
            else:
                delattr(obj, name)


class CallRecord:
    """What one instrumented call saw: its timer, its CFG batcher (or None), cache counts."""

    def __init__(self, timer: StageTimer, batcher: CFGBatcher | None):
        self.timer, self.batcher = timer, batcher
        self.cache_hits = self.cache_misses = self.encode_calls = 0
        self.text_tokens = self.image_tokens = None  # of the first encode / transformer call

    def step_end(self, pipe, step, timestep, callback_kwargs):
        self.timer.step_end()
        return {}

    def timings(self) -> dict:
        out = self.timer.result()
        out.update(encode_calls=self.encode_calls, cache_hits=self.cache_hits, cache_misses=self.cache_misses,
                   steps=len(out["step_ms"]), text_tokens=self.text_tokens, image_tokens=self.image_tokens)
        if self.batcher is not None:
            out.update(batched_cfg_calls=self.batcher.batched_calls)
        return out


@contextlib.contextmanager
def instrument(pipe, device, *, cache: EmbeddingCache | None = None, batched_cfg: bool = False):
    """Wrap ``pipe``'s encode, VAE and transformer calls for one pipeline call; yields a
    ``CallRecord`` whose ``step_end`` goes to ``callback_on_step_end``."""
    rec = CallRecord(StageTimer(device), CFGBatcher() if batched_cfg else None)
    timer, batcher = rec.timer, rec.batcher

    def wrap_encode(encode_prompt):
        def encode(prompt=None, image=None, device=None, num_images_per_prompt=1, prompt_embeds=None,
                   prompt_embeds_mask=None, max_sequence_length=1024, **kw):
            rec.encode_calls += 1
            timer.begin("encode")
            key = None
            if cache is not None and prompt_embeds is None and prompt is not None:
                key = embedding_key(prompt, image, n=num_images_per_prompt, max_len=max_sequence_length,
                                    device=str(device), **{k: repr(v) for k, v in kw.items()})
                hit = cache.get(key)
            else:
                hit = None
            if hit is not None:
                rec.cache_hits += 1
                out = hit
            else:
                out = encode_prompt(prompt=prompt, image=image, device=device,
                                    num_images_per_prompt=num_images_per_prompt, prompt_embeds=prompt_embeds,
                                    prompt_embeds_mask=prompt_embeds_mask, max_sequence_length=max_sequence_length,
                                    **kw)
                if key is not None:
                    rec.cache_misses += 1
                    cache.put(key, out)
            timer.end("encode")
            if rec.text_tokens is None:
                rec.text_tokens = int(out[0].shape[1])
            if batcher is not None:
                batcher.encoded(*out)
            return out
        return encode

    def wrap_stage(stage):
        def make(fn):
            def wrapped(*args, **kwargs):
                timer.begin(stage)
                try:
                    return fn(*args, **kwargs)
                finally:
                    timer.end(stage)
            return wrapped
        return make

    def wrap_forward(forward):
        def wrapped(*args, **kwargs):
            timer.transformer_call()
            hs = kwargs.get("hidden_states")
            if rec.image_tokens is None and isinstance(hs, torch.Tensor):
                rec.image_tokens = int(hs.shape[1])  # output + reference latent tokens
            if batcher is None:
                return forward(*args, **kwargs)
            return batcher.forward(forward, args, kwargs)
        return wrapped

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(pipe, "encode_prompt", wrap_encode))
        stack.enter_context(_patched(pipe.vae, "encode", wrap_stage("vae_encode")))
        stack.enter_context(_patched(pipe.vae, "decode", wrap_stage("decode")))
        stack.enter_context(_patched(pipe.transformer, "forward", wrap_forward))
        timer.begin("total")
        yield rec
        timer.end("total")
