"""Quantization as transforms of the parameter tree: NF4 / FP4 (bitsandbytes layout, optional
double quantization), int8 row-wise and int4 group-wise weight leaves through the one linear op.

    from jaxtune.quant import QuantConfig, quantize
    params = quantize(params, QuantConfig(kind="nf4", double_quant=True))   # ~4.13 bits / parameter
    params = apply_lora(params, LoraConfig(rank=16, targets=("all-linear",)), rng)   # QLoRA

`jaxtune.peft.merge_quantized` folds adapters into quantized bases (dense, or requantized on
request); `jaxtune.quant.optim` has 8-bit Adam state; `jaxtune.quant.codes` the bitsandbytes-compatible
code tables and blockwise (de)quantization.
"""

from jaxtune.quant import matmul  # noqa: F401  (registers QuantizedWeight's rule of the one linear op)
from jaxtune.quant.weight import (
    QuantConfig,
    QuantizedWeight,
    bits_per_parameter,
    dequantize,
    is_quantized,
    quantize,
    quantize_kernel,
    quantized_paths,
)
from jaxtune.utils.moved import moved_names

__all__ = [
    "QuantConfig", "QuantizedWeight", "bits_per_parameter", "dequantize", "is_quantized",
    "quantize", "quantize_kernel", "quantized_paths",
]

__getattr__ = moved_names(__name__, {"merge_quantized": "jaxtune.peft.merge_quantized (it folds adapters)"})
