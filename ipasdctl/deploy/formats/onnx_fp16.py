"""`onnx-fp16`: the fp32 ONNX file with weights and activations in float16, inputs and outputs kept float32
(so predict and users' code feed and read float32 as before), validated against PyTorch.

- BatchNorm first: onnxruntime's basic graph optimisation (hardware-independent: constant folding, Conv+BN
  fusion) folds every BatchNorm that follows a convolution into it, so no fp16 BatchNorm divides by a float16
  sqrt(var + eps) (a precision trap: eps 1e-5 is below float16's smallest normal number). A BatchNorm that
  cannot fold (a pre-activation one after a residual Add) stays float32, with Casts around it.
- Conversion: onnxruntime's own `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`,
  bundled with onnxruntime (onnxconverter-common carries the same converter as a separate dependency); its
  graph is sorted topologically afterwards (the converter appends its Casts at the end of the node list).
- Tolerance: |ort - torch| <= 1e-2 + 1e-2 * |torch| on the logits. fp16 keeps 11 significant bits (a relative
  step of 4.9e-4) and each layer rounds again. Measured on the whole test sets: a ResNet-8 on digits (logits up
  to 3.4) differs by at most 0.0063 and needs atol 0.0048 at rtol 1e-2; a ResNet-20 on CIFAR-10 (6 epochs on
  5,000 images, logits up to 10.1, 10,000 test images) by at most 0.0057 and needs atol 0.0032; top-1 agreement
  100 % and 99.96 % (4 near-ties flipped), and on both the same test top-1 as fp32. The fp32 tolerance, 1e-4,
  would fail every model; top-1 agreement is reported beside the figures.
- onnxruntime's CPU provider runs few operators in float16 (it casts around the rest), so on a CPU fp16 is
  often slower than fp32: `bench` says so in one line. It is the format for GPUs (`bench --provider cuda`).
"""

from __future__ import annotations

from pathlib import Path

from .. import onnx_files
from ..onnx_files import count_ops, file_size, quiet_exporters, save_model
from ..validation import ExportValidationError, validate_against_torch
from .base import FORMATS, ExportFormat, ExportJob, Written, batchnorm_count

FP16_ATOL = 1e-2
FP16_RTOL = 1e-2
CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16"
KEPT_FLOAT = ("BatchNormalization",)  # besides the converter's own block list: what cannot fold stays float32


def fold_batchnorm(fp32_path: Path, folded_path: Path) -> None:
    """`fp32_path` after onnxruntime's basic (hardware-independent) graph optimisation, which fuses each
    BatchNorm after a convolution into it, written to `folded_path`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded_path)
    if file_size(fp32_path) > onnx_files.SINGLE_FILE_LIMIT_BYTES:  # protobuf's 2 GiB: the weights go beside it
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         folded_path.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(fp32_path), sess_options=options, providers=["CPUExecutionProvider"])


def convert_to_fp16(fp32_path: Path, fp16_path: Path, work_dir: Path, batchnorm_layers: int) -> dict:
    """Write the float16 model of `fp32_path` (BatchNorm folded first, float32 inputs and outputs); returns what
    the conversion did, for the record and the metadata."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    folded_path = work_dir / f"{fp32_path.stem}-folded.onnx"
    try:
        fold_batchnorm(fp32_path, folded_path)
        left_float = count_ops(folded_path, "BatchNormalization")
        with quiet_exporters():
            model = convert_float_to_float16(onnx.load(str(folded_path)), keep_io_types=True,
                                             op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(KEPT_FLOAT))
            graph = OnnxModel(model)
            graph.topological_sort()
        save_model(graph.model, fp16_path)
    finally:
        for leftover in (folded_path, folded_path.with_name(folded_path.name + ".data")):
            leftover.unlink(missing_ok=True)
    float_types = [v.type.tensor_type.elem_type for v in (*graph.model.graph.input, *graph.model.graph.output)]
    if any(t != onnx.TensorProto.FLOAT for t in float_types):
        raise ExportValidationError(f"the fp16 model's inputs or outputs are not float32 ({float_types}); "
                                    "nothing was written — report the model")
    nodes = graph.model.graph.node
    return {"converter": CONVERTER, "keep_io_types": True, "kept_float": list(KEPT_FLOAT),
            "batchnorm_folded": batchnorm_layers - left_float, "batchnorm_left_float": left_float,
            "casts": sum(n.op_type == "Cast" for n in nodes), "nodes": len(nodes)}


@FORMATS.register
class OnnxFp16(ExportFormat):
    name = "onnx-fp16"
    suffix = "-fp16"
    precision = "fp16"
    made_from = "onnx"
    summary_line = ("fp16 weights and activations of the fp32 file, float32 inputs and outputs, BatchNorm "
                    "folded first (onnxruntime's float16 converter); for GPUs")
    tolerance = f"against PyTorch: atol {FP16_ATOL:g} / rtol {FP16_RTOL:g} on the logits"
    slower_note = ("onnxruntime's CPU provider runs few operators in float16 and casts around the rest; ship fp32 "
                   "for CPUs, fp16 for GPUs (bench --provider cuda)")

    def export(self, job: ExportJob, path: Path) -> Written:
        conversion = convert_to_fp16(job.source_of(self).path, path, job.staging, batchnorm_count(job.model))
        return Written(metadata={"fp16_conversion": conversion}, record={"fp16_conversion": conversion})

    def validate(self, job: ExportJob, path: Path) -> dict:
        batches = validate_against_torch(job.model, path, job.images, job.options.validation_batch_sizes,
                                         FP16_ATOL, FP16_RTOL, session=self.session(path))
        return {"reference": "PyTorch (fp32)", "atol": FP16_ATOL, "rtol": FP16_RTOL,
                "provider": "CPUExecutionProvider", "images": "test set", "batches": batches}

    def provider_chain(self, provider: str) -> list:
        chain = super().provider_chain(provider)
        if provider == "tensorrt":  # TensorRT builds fp32 engines unless told that fp16 layers are allowed
            chain[0] = (chain[0], {"trt_fp16_enable": True})
        return chain
