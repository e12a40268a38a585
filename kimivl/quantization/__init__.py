"""Weight quantization of the decoder (:mod:`kimivl.quantization.int8`): ``from_pretrained(..., quantization="int8")``,
or :func:`quantize_model` on a loaded model; docs/quantization.md."""
from kimivl.ops.int8_linear import Int8Linear, dequantize_weight, quantize_weight
from kimivl.quantization.int8 import METHODS, quantize_model

__all__ = ["METHODS", "Int8Linear", "dequantize_weight", "quantize_model", "quantize_weight"]
