"""Export a piecewise-quant checkpoint to a format that engines without this package load.

``compressed-tensors`` (:func:`export_compressed_tensors`) writes the layout llm-compressor writes
and that stock transformers (through the ``compressed-tensors`` package) and stock vLLM load with
their own kernels. Only the grids those engines have are exported, and the codes are carried over
exactly (no re-quantization, so the exported model computes the same weights):

=====================================  ===================  =========================================
our layers                             compressed-tensors   tensors per layer
=====================================  ===================  =========================================
uniform 4/8-bit, weight-only           ``pack-quantized``   ``weight_packed`` (int32, 32/b codes per
(symmetric or with zero points;                             word, low bits first), ``weight_scale``
group size, channel or tensor)                              (out, n_groups), ``weight_shape``;
                                                            asymmetric: ``weight_zero_point`` (int32,
                                                            packed along the output dimension)
uniform 8-bit symmetric per channel,   ``int-quantized``    ``weight`` (int8), ``weight_scale``
int8 activations (per token dynamic,                        (out, 1) float32; static: ``input_scale``
or per tensor static): W8A8
fp8 weights, weight-only               ``naive-quantized``  ``weight`` (float8_e4m3fn),
                                                            ``weight_scale`` (out, 1) float32
fp8 weights, fp8 activations           ``float-quantized``  as above; static: ``input_scale``
=====================================  ===================  =========================================

Code mapping: our uniform code ``c`` (``0 .. 2^b - 1``) is compressed-tensors' signed value
``c - 2^(b-1)`` stored with the same offset, so the packed words hold ``c`` itself; our zero point
``z`` is their signed ``z - 2^(b-1)`` (dequantization ``(c - z) * s`` on both sides). A per-tensor
scale is written per output channel (the same value repeated), which every engine reads.

Refused, with the reason and what to use instead: the piecewise grid and plugin grids (no other
engine has them), 2- and 3-bit codes (stock vLLM has no kernel), int4 or clipped activations,
int activations with asymmetric, grouped or non-8-bit weights, fp8 activations with int weights.

``gguf`` (:func:`export_gguf`, Llama models): uniform symmetric 4-bit g32 layers as Q4_0 and 8-bit
g32 as Q8_0 (``(c - 8) * d`` and ``(c - 128) * d``, our codes and float16 scales unchanged), float
tensors as stored, with the names, metadata, Q/K row order and GPT-2 BPE vocabulary llama.cpp's
``convert_hf_to_gguf.py`` writes. Checked by reading it back with the ``gguf`` package; llama.cpp
itself is not run here.

The package: :mod:`.ct` writes compressed-tensors, :mod:`.gguf_file` GGUF, :mod:`.checks` refuses
from config.json alone, and :mod:`.common` holds the error, the summary and what both writers share.
"""

from __future__ import annotations

from .checks import check_exportable_config
from .common import FORMATS, SAFETENSORS_INDEX, ExportError, ExportSummary
from .ct import convert_layer, ct_scheme, engine_notes, export_compressed_tensors, pack_int32, refusal
from .gguf_file import GGUF_FILE, GGUF_GROUP, export_gguf, gguf_blocks, gguf_refusal, llama_permute_rows

__all__ = [
    "ExportError", "ExportSummary", "FORMATS", "ct_scheme", "refusal", "export_compressed_tensors",
    "pack_int32", "check_exportable_config", "export_gguf", "gguf_refusal",
]
