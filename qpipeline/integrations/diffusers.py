"""qkernels as a diffusers quantization backend.

    from qpipeline import QKernelsConfig
    transformer = QwenImageTransformer2DModel.from_pretrained(
        path, subfolder="transformer", torch_dtype=torch.bfloat16, device_map="cuda",
        quantization_config=QKernelsConfig(format="w8a8-fp8"))
    pipe = QwenImageEditPlusPipeline.from_pretrained(path, torch_dtype=torch.bfloat16,
        quantization_config=PipelineQuantizationConfig(quant_backend="qkernels",
            quant_kwargs={"format": "w8a8-fp8"}, components_to_quantize=["transformer"]))
    pipe.save_pretrained(out)             # config.json with a quantization_config block + safetensors
    QwenImageTransformer2DModel.from_pretrained(out / "transformer")   # the same 8-bit model

Quantizing while loading: the model is built on the meta device, the chosen Linear layers are
swapped for empty ``QuantLinear`` layers, and each high-precision weight is quantized on the
target device as it is read from the file, so the device never holds more than the 8-bit model
plus one high-precision weight. A folder saved from a quantized model is rebuilt from the
config's per-layer map and its 8-bit tensors are assigned exactly as stored (diffusers would
cast the fp32 scales to ``torch_dtype``; they are read from the file instead).
"""

from __future__ import annotations

import torch

from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from qkernels import QuantLinear

from . import _common
from ._common import FIXED_BUFFERS, QUANT_METHOD, QKernelsConfigFields

__all__ = ["QKernelsConfig", "QKernelsQuantizer", "register", "mark_quantized"]


class QKernelsConfig(QKernelsConfigFields, QuantizationConfigMixin):
    __doc__ = QKernelsConfigFields.__doc__


class QKernelsQuantizer(DiffusersQuantizer):
    """diffusers' side of ``QKernelsConfig``: quantizes while loading, or rebuilds a saved model."""

    requires_calibration = False
    required_packages = ["accelerate"]
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.torch_dtype = None

    def validate_environment(self, *args, **kwargs):
        from diffusers.utils import is_accelerate_available

        if not is_accelerate_available():
            raise ImportError("quantizing with qkernels while loading needs accelerate: pip install accelerate")

    def update_torch_dtype(self, torch_dtype):
        # A saved folder reloads in the dtype it was saved in unless told otherwise (diffusers
        # would upcast its bf16 layers to fp32): the reloaded model is the saved one.
        saved = self.quantization_config.torch_dtype
        if torch_dtype is None and self.pre_quantized and saved:
            torch_dtype = getattr(torch, saved)
        # the compute dtype of the layers kept in high precision and of the biases
        self.torch_dtype = torch_dtype if torch_dtype is not None else torch.float32
        return torch_dtype

    def update_device_map(self, device_map):
        self.device = _common.target_device(device_map)
        return device_map

    def adjust_target_dtype(self, target_dtype):
        return torch.int8  # for device_map="auto" size estimates: one byte per weight

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        from diffusers.utils import get_module_from_name

        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QuantLinear) and tensor_name in FIXED_BUFFERS

    def check_quantized_param_shape(self, param_name, current_param, loaded_param):
        return True  # fill() checks dtype and shape against the layer, naming it

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict=None,
                               unexpected_keys=None, **kwargs):
        from diffusers.utils import get_module_from_name

        module, tensor_name = get_module_from_name(model, param_name)
        stored = state_dict[param_name] if state_dict is not None and param_name in state_dict else param_value
        _common.fill(module, param_name.rpartition(".")[0], tensor_name, stored, param_value, target_device,
                     self.pre_quantized, "qkernels")

    def update_missing_keys(self, model, missing_keys, prefix):
        if self.pre_quantized:
            return missing_keys
        # weight_scale is computed while loading, not read
        made = {f"{n}.weight_scale" for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        return [k for k in missing_keys if k not in made and k.removeprefix(prefix + ".") not in made]

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=(), **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            if not config.layers:
                raise _common.CheckpointError("the model's quantization_config says qkernels but lists no quantized "
                                              "layers: it was not written by qkernels")
            _common.replace_on_meta(model, config.layers, "quantization_config")
            return model
        for m in keep_in_fp32_modules or ():
            if m not in config.modules_to_not_convert:
                config.modules_to_not_convert.append(m)
        recipe = config.build_recipe(type(model).__name__)
        device = getattr(self, "device", None) or _common.target_device(device_map)
        config.layers = _common.plan_layers(model, recipe, device, self.torch_dtype or torch.float32)
        _common.replace_on_meta(model, config.layers, "qkernels")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _common.finish(model, "qkernels")
        self.quantization_config.torch_dtype = _common.model_dtype(model)
        return model

    def _dequantize(self, model):
        raise NotImplementedError("a qkernels model keeps its 8-bit weights; load the original checkpoint for bf16")

    @property
    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, QKernelsConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, QKernelsQuantizer)


def mark_quantized(model) -> None:
    """A diffusers model quantized outside from_pretrained (quantize_model, load_quantized): attach
    the quantizer and the config, as from_pretrained does, so that save_pretrained writes a folder
    that reloads as this same 8-bit model."""
    register()
    layers = _common.layer_specs(model)
    if not layers:
        return
    config = QKernelsConfig(layers=layers, torch_dtype=_common.model_dtype(model))
    model.register_to_config(quantization_config=config)
    model.hf_quantizer = QKernelsQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method


register()
