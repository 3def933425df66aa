"""Recipes: which layers get quantized, with which backend, and how activations are scaled.

A recipe is data: a versioned dataclass that round-trips through JSON, so the exact choice
that made a checkpoint can be stored, diffed and re-run.

    {"version": 1, "backend": "auto", "format": "w8a8-fp8",
     "rules": [["img_in", "skip"], ["transformer_blocks.*.img_mlp.*", "int8-layerwise"]],
     "activation": "dynamic", "smoothquant_alpha": null, "min_features": 16, "max_error": null}

Rules are ``(glob, backend-or-"skip")`` pairs matched in order against a module's qualified
name (``fnmatch``: ``*`` also crosses dots); the first match wins; no match uses ``backend``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from qkernels import formats
from qkernels.attention import MODES as _ATTENTION_MODES
from qkernels.errors import QKernelsError, RecipeError
from qkernels.registry import get_backend

__all__ = ["Recipe", "RECIPES", "get_recipe", "RECIPE_VERSION", "SKIP"]

RECIPE_VERSION = 1
SKIP = "skip"
_ACTIVATIONS = ("dynamic", "static")


def _check_backend(name, where: str) -> None:
    if not isinstance(name, str):
        raise RecipeError(f"{where}: backend must be a string, got {name!r}")
    if name == "auto":
        return
    try:
        backend = get_backend(name)
    except QKernelsError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    if backend.format == "none":
        raise RecipeError(f"{where}: backend {name!r} does not quantize; use \"skip\" to keep a layer in high precision")


@dataclass
class Recipe:
    """How to quantize a model. Validated on construction; bad values raise :class:`RecipeError`."""

    backend: str = "auto"
    format: str | None = None  # narrows "auto" (e.g. "w8a8-fp8"); must agree with an explicit backend
    rules: list[tuple[str, str]] = field(default_factory=list)
    activation: str = "dynamic"
    smoothquant_alpha: float | None = None  # used only when calibration statistics are given
    min_features: int = 16
    max_error: float | None = None  # error budget on the model's output (relative, vs high precision); qpipeline.sensitivity
    # after quantizing (and when loading the checkpoint), rewire blocks to the fused kernels
    # (qpipeline.blocks); a block that cannot be fused stays as it is, with the reason reported
    fuse: bool = False
    name: str | None = None
    # "int8-fp8" | "bf16": qkernels.attention for the model's joint attention (Qwen-Image); None keeps
    # the model's own. Optional within version 1: left out of the JSON when None, so such files
    # read as before everywhere.
    attention: str | None = None
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if self.version != RECIPE_VERSION:
            raise RecipeError(
                f"recipe version {self.version!r} is not supported by this qkernels (it reads version "
                f"{RECIPE_VERSION}); re-create the recipe with `Recipe(...).to_json()` or start from "
                f"`get_recipe('generic')`"
            )
        _check_backend(self.backend, "recipe")
        if self.format is not None:
            if self.format not in formats.FORMATS:
                raise RecipeError(f"unknown format {self.format!r}; formats: {', '.join(formats.FORMATS)}")
            if self.backend != "auto" and get_backend(self.backend).format != self.format:
                raise RecipeError(
                    f"backend {self.backend!r} computes {get_backend(self.backend).format!r}, not the recipe's "
                    f"format {self.format!r}: drop one of the two, or use backend 'auto'"
                )
        rules = []
        if not isinstance(self.rules, (list, tuple)):
            raise RecipeError(f"rules must be a list of [glob, backend] pairs, got {type(self.rules).__name__}")
        for i, rule in enumerate(self.rules):
            if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str) or not rule[0]:
                raise RecipeError(f"rule {i}: expected [glob, backend-or-\"skip\"], got {rule!r}")
            if rule[1] != SKIP:
                _check_backend(rule[1], f"rule {i} ({rule[0]!r})")
            rules.append((rule[0], rule[1]))
        self.rules = rules
        if self.activation not in _ACTIVATIONS:
            raise RecipeError(f"activation must be 'dynamic' or 'static', got {self.activation!r}")
        if self.activation == "static":
            fmts = {self.format} if self.format else set()
            fmts |= {get_backend(b).format for b in [self.backend, *(r[1] for r in rules)] if b not in ("auto", SKIP)}
            weight_only = sorted(f for f in fmts if not formats.get_format(f).quantizes_activations)
            if weight_only:
                raise RecipeError(f"activation 'static' needs a W8A8 format; {', '.join(weight_only)} is weight-only")
        if self.smoothquant_alpha is not None:
            a = self.smoothquant_alpha
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
                raise RecipeError(f"smoothquant_alpha must be a number in [0, 1] or null, got {a!r}")
            self.smoothquant_alpha = float(a)
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 0:
            raise RecipeError(f"min_features must be a non-negative integer, got {self.min_features!r}")
        if not isinstance(self.fuse, bool):
            raise RecipeError(f"fuse must be true or false, got {self.fuse!r}")
        if self.attention is not None and self.attention not in _ATTENTION_MODES:
            raise RecipeError(f"attention must be one of {', '.join(_ATTENTION_MODES)} or null, got {self.attention!r}")
        if self.max_error is not None:
            e = self.max_error
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0:
                raise RecipeError(f"max_error must be a positive number (relative model output error) or null, got {e!r}")
            self.max_error = float(e)

    # ------------------------------------------------------------------------------------------

    def backend_for(self, name: str) -> tuple[str, int | None]:
        """``(backend or "skip", index of the rule that matched or None)`` for a qualified name."""
        for i, (pattern, backend) in enumerate(self.rules):
            if fnmatch.fnmatchcase(name, pattern):
                return backend, i
        return self.backend, None

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rules"] = [list(r) for r in self.rules]
        if d["attention"] is None:
            del d["attention"]
        return {"version": d.pop("version"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe is a JSON object, got {type(d).__name__}")
        if "version" not in d:
            raise RecipeError(f"recipe has no 'version'; add \"version\": {RECIPE_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        if d["version"] != RECIPE_VERSION:
            # checked before the other fields: an old file's values may mean something else
            raise RecipeError(
                f"recipe version {d['version']!r} is not supported (this qkernels reads version "
                f"{RECIPE_VERSION}); update the file's fields and set \"version\": {RECIPE_VERSION}"
            )
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Recipe":
        """Parse a JSON string, or read a ``.json`` file if given a path."""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            try:
                text = Path(text_or_path).read_text()
            except OSError as exc:
                raise RecipeError(f"cannot read recipe file {text_or_path}: {exc.strerror or exc}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"recipe is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
        return cls.from_dict(d)


# ----------------------------------------------------------------------------------------------
# built-in recipes

# Below 16 features a layer's bytes are negligible and its GEMM is launch-bound: nothing to win.
_MIN_FEATURES = 16

_QWEN_IMAGE_RULES = [
    # input embedders: K = 64 latent channels / the text width; their error lands on every token
    ("img_in", SKIP),
    ("txt_in", SKIP),
    # timestep embedding: M = batch (1-2 rows), free to keep, and every block's adaLN reads it
    ("time_text_embed.*", SKIP),
    # final adaLN modulation: scales/shifts the last hidden state right before the output
    ("norm_out.*", SKIP),
    # last projection writes the predicted velocity directly; no later layer averages its error
    ("proj_out", SKIP),
]

RECIPES: dict[str, Recipe] = {
    "generic": Recipe(name="generic", min_features=_MIN_FEATURES),
    "qwen-image": Recipe(name="qwen-image", rules=list(_QWEN_IMAGE_RULES), min_features=_MIN_FEATURES),
}


def get_recipe(name: str) -> Recipe:
    """A copy of a built-in recipe (``generic``, ``qwen-image``)."""
    try:
        return dataclasses.replace(RECIPES[name], rules=list(RECIPES[name].rules))
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; built-in recipes: {', '.join(RECIPES)} (or a JSON file)") from None
