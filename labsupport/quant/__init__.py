"""Quantization: round-to-nearest and GPTQ weights in packed storage, and the kernels that use them.

Introduced in lab 21 ("Quantization"). One module per step of the lesson:

- `formats`: symmetric integer codes, float16 scales, bit-packing (`QuantizedTensor`);
- `rtn`: round-to-nearest (`quantize_rtn`);
- `gptq`: GPTQ with error compensation (`gptq`, `gptq_from_hessian`);
- `modules`: quantized layers and whole models (`quantize_model`, `saved_bytes`), and the
  16-bit layers a quantized checkpoint keeps (`HalfLinear`, `HalfEmbedding`);
- `kernels`: torch's integer kernels fed with our codes (`with_kernels`, `kernel_available`)
  and torchao's `quantize_` where it has the fast kernel (`torchao_quantized`);
- `outliers`: activation quantization and outlier features (`fake_quantize`).

Everything is importable from `labsupport.quant` directly.
"""

from .formats import SCALE_DTYPE, SUPPORTED_BITS, QuantizedTensor, pack_codes, qmax, unpack_codes
from .gptq import gptq, gptq_from_hessian, hessian
from .kernels import (
    INT4_GROUP_SIZES,
    TORCHAO_SCHEMES,
    Int4Linear,
    Int8Linear,
    kernel_available,
    torchao_config,
    torchao_quantized,
    with_kernels,
)
from .modules import (
    HalfEmbedding,
    HalfLinear,
    QuantizedEmbedding,
    QuantizedLinear,
    capture_inputs,
    quantize_model,
    saved_bytes,
)
from .outliers import (
    GRANULARITIES,
    ActQuantLinear,
    add_outlier_features,
    fake_quantize,
    quantize_activations,
)
from .rtn import quantize_rtn

__all__ = [
    "GRANULARITIES", "INT4_GROUP_SIZES", "SCALE_DTYPE", "SUPPORTED_BITS", "TORCHAO_SCHEMES",
    "ActQuantLinear",
    "HalfEmbedding", "HalfLinear", "Int4Linear", "Int8Linear", "QuantizedEmbedding",
    "QuantizedLinear", "QuantizedTensor",
    "add_outlier_features", "capture_inputs", "fake_quantize", "gptq", "gptq_from_hessian",
    "hessian", "kernel_available", "pack_codes", "qmax", "quantize_activations",
    "quantize_model", "quantize_rtn", "saved_bytes", "torchao_config", "torchao_quantized",
    "unpack_codes", "with_kernels",
]
