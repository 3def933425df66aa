"""qkernels as a transformers quantization backend (``register_quantization_config`` /
``register_quantizer``).

    from qpipeline.integrations.transformers import QKernelsConfig
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 quantization_config=QKernelsConfig(format="w8a8-int8"))
    model.save_pretrained(out)                    # config.json with a quantization_config block
    AutoModelForCausalLM.from_pretrained(out)     # the same 8-bit model

The same fields as the diffusers ``QKernelsConfig`` (so ``PipelineQuantizationConfig(
quant_backend="qkernels")`` can build one for each library). While loading, each Linear weight is
quantized as transformers reads it (a quantize op per weight); a saved folder's 8-bit tensors
are assigned uncast and checked against the config's layer map afterwards. A tied ``lm_head``
stays in high precision (quantizing it would untie it and keep a second copy).
"""

from __future__ import annotations

import torch
import transformers

from qkernels.capabilities import major_minor

from ._common import TRANSFORMERS_MIN_VERSION

if major_minor(transformers.__version__) < TRANSFORMERS_MIN_VERSION:
    _need = ".".join(map(str, TRANSFORMERS_MIN_VERSION))
    raise ImportError(f"qkernels' transformers quantizer needs transformers >= {_need}, found "
                      f"{transformers.__version__} (pip install -U 'transformers>={_need}'); quantize_model / "
                      "load_quantized work without it")

from transformers.core_model_loading import ConversionOps  # noqa: E402
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING  # noqa: E402
from transformers.quantizers.base import HfQuantizer  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

from qkernels import QuantLinear, formats  # noqa: E402

from . import _common  # noqa: E402
from ._common import FIXED_BUFFERS, QUANT_METHOD, QKernelsConfigFields  # noqa: E402

__all__ = ["QKernelsConfig", "QKernelsHfQuantizer", "register", "mark_quantized"]


class QKernelsConfig(QKernelsConfigFields, QuantizationConfigMixin):
    __doc__ = QKernelsConfigFields.__doc__


def _module(model, name):
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


class QKernelsQuantize(ConversionOps):
    """Quantizes one high-precision Linear weight into its QuantLinear, where it was loaded."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, (list, tuple)) else value
        module, tensor_name = _module(model, full_layer_name)
        name = full_layer_name.rpartition(".")[0]
        _common.fill(module, name, tensor_name, value, value, value.device, False, "qkernels")
        for b in ("weight", "weight_scale"):
            module._buffers[b]._is_hf_initialized = True
            if missing_keys is not None:
                missing_keys.discard(f"{name}.{b}")
        return {}


class QKernelsHfQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.fixed_keys: set[str] = set()
        self.dtype = None

    @property
    def quantized_element_size(self):
        return 1

    def update_dtype(self, dtype):
        saved = self.quantization_config.torch_dtype
        if (dtype is None or dtype == "auto") and self.pre_quantized and saved:
            dtype = getattr(torch, saved)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        return dtype

    def update_device_map(self, device_map):
        self.device = _common.target_device(device_map)
        return device_map

    def param_needs_quantization(self, model, param_name, **kwargs) -> bool:
        module, tensor_name = _module(model, param_name)
        return not self.pre_quantized and isinstance(module, QuantLinear) and tensor_name == "weight"

    def get_quantize_ops(self):
        return QKernelsQuantize(self)

    def get_new_dtype(self, converter, param, dtype):
        # a stored 8-bit layer's tensors are assigned exactly as stored (checked after loading)
        targets = getattr(converter, "target_patterns", None) or []
        if any(t in self.fixed_keys for t in targets):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            if not config.layers:
                raise _common.CheckpointError("the model's quantization_config says qkernels but lists no quantized "
                                              "layers: it was not written by qkernels")
        else:
            for m in keep_in_fp32_modules or ():
                if m not in config.modules_to_not_convert:
                    config.modules_to_not_convert.append(m)
            recipe = config.build_recipe(type(model).__name__)
            config.layers = _common.plan_layers(model, recipe, getattr(self, "device", torch.device("cpu")),
                                                self.dtype or torch.bfloat16)
        _common.replace_on_meta(model, config.layers, "quantization_config" if self.pre_quantized else "qkernels")
        # Each 8-bit weight's placeholder in the load dtype, not int8 / e4m3: transformers < 5.23
        # casts a checkpoint tensor to its placeholder's dtype before anything else sees it, so a
        # bf16 weight quantized on load reached the quantize op as an int8 cast of itself, and a
        # folder whose 8-bit layer holds a bf16 tensor was cast to int8 and passed the check
        # after loading. Stored 8-bit tensors are never cast (their dtype is not a float one, or
        # get_new_dtype below), and the quantize op replaces the placeholder.
        for name in config.layers:
            m = model.get_submodule(name)
            m._buffers["weight"] = torch.empty(m._buffers["weight"].shape, dtype=self.dtype or torch.bfloat16,
                                               device="meta")
        self.fixed_keys = {f"{n}.{b}" for n in config.layers for b in FIXED_BUFFERS}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, m in model.named_modules():
            if not isinstance(m, QuantLinear):
                continue
            want = {"weight": formats.get_format(m.format).dtype, "weight_scale": torch.float32,
                    "input_scale": torch.float32, "input_smooth": torch.float32}
            for b, dtype in want.items():
                t = m._buffers.get(b)
                if t is not None and not t.is_meta and t.dtype != dtype:
                    raise _common.CheckpointError(
                        f"qkernels: layer {name} is {m.format} in quantization_config, but {name}.{b} is "
                        f"{_common.dtype_name(t.dtype)} (expected {_common.dtype_name(dtype)}): these tensors are "
                        f"not a qkernels {m.format} layer")
        _common.finish(model, "qkernels")
        self.quantization_config.torch_dtype = _common.model_dtype(model)
        return model

    def is_serializable(self, **kwargs):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self):
        return True


def register() -> None:
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, QKernelsConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, QKernelsHfQuantizer)


def mark_quantized(model) -> None:
    """A transformers model quantized outside from_pretrained: attach the quantizer and config."""
    register()
    layers = _common.layer_specs(model)
    if not layers:
        return
    config = QKernelsConfig(layers=layers, torch_dtype=_common.model_dtype(model))
    model.config.quantization_config = config
    model.hf_quantizer = QKernelsHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method


register()
