"""Write the Triton model repository around an exported bundle: one directory per model with three configs.

- `config.pbtxt` (default; GPU nodes): onnxruntime backend, KIND_GPU instances, and for the patch encoder the
  onnxruntime TensorRT FP16 accelerator with explicit min/opt/max profiles and an engine cache;
- `configs/cpu.pbtxt` (`--model-config-name=cpu`): onnxruntime backend on CPU instances (a full Triton image
  on a CPU node);
- `configs/cpu_python.pbtxt` (`--model-config-name=cpu_python`): the Python backend running the same ONNX
  through onnxruntime (`<version>/model.py`), for the `tritonserver` of the `nvidia-pytriton` wheel, which has
  no onnxruntime backend. This is what the tests and `bench/encoder.py` run against.

Every config: `max_batch_size` > 0 only where axis 0 is the batch of every tensor (patch encoder, text
encoder), dynamic batching with a queue policy and two priority levels (1 interactive/PACS, 2 batch),
instance groups, `model_warmup`, and a version policy pinned to the exported version.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from service.inference.bundle import Bundle, ModelSpec, TensorSpec

TRITON_TYPES = {
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "bool": "TYPE_BOOL",
}
VARIANTS = ("gpu", "cpu", "cpu_python")
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")


def _dims(t: TensorSpec, batched: bool) -> list[int]:
    shape = t.shape[1:] if batched else t.shape
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor(t: TensorSpec, batched: bool) -> str:
    dims = ", ".join(str(d) for d in _dims(t, batched))
    return f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} dims: [ {dims} ] }}'


def _warmup_dims(t: TensorSpec, batched: bool, n_dynamic: int) -> list[int]:
    return [n_dynamic if d == -1 else d for d in _dims(t, batched)]


def render_config(
    spec: ModelSpec,
    variant: str = "gpu",
    *,
    instances: int | None = None,
    max_queue_delay_us: int = 2000,
    max_queue_size: int = 8192,
    queue_timeout_us: int = 60_000_000,
    intra_op_threads: int = 0,
    trt_cache: str = "/trt-cache",  # writable volume outside the read-only repository (docker/triton.Dockerfile)
) -> str:
    """The `config.pbtxt` text for one model and one deployment variant."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    batched = spec.max_batch_size > 0
    lines = [f'name: "{spec.name}"']
    lines.append('backend: "python"' if variant == "cpu_python" else 'backend: "onnxruntime"')
    lines.append(f"max_batch_size: {spec.max_batch_size}")
    if variant != "cpu_python":
        lines.append('default_model_filename: "model.onnx"')
    lines.append("input [\n" + ",\n".join(_tensor(t, batched) for t in spec.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(t, batched) for t in spec.outputs) + "\n]")
    lines.append(f"version_policy: {{ specific: {{ versions: [ {spec.version} ] }} }}")
    kind = "KIND_GPU" if variant == "gpu" else "KIND_CPU"
    count = instances or (2 if variant == "gpu" else 1)
    lines.append(f"instance_group [ {{ count: {count} kind: {kind} }} ]")
    if batched:
        lines.append(
            "dynamic_batching {\n"
            f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
            "  priority_levels: 2\n"
            "  default_priority_level: 2\n"
            "  default_queue_policy {\n"
            f"    max_queue_size: {max_queue_size}\n"
            "    timeout_action: REJECT\n"
            f"    default_timeout_microseconds: {queue_timeout_us}\n"
            "    allow_timeout_override: true\n"
            "  }\n"
            "}"
        )
    params = {"onnx_file": spec.file.rsplit("/", 1)[-1], "intra_op_threads": str(intra_op_threads)}
    if variant == "cpu_python":
        lines.append(
            "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
        )
    if variant == "gpu" and spec.role == "patch_encoder":
        x = spec.inputs[0]
        static = "x".join(str(d) for d in _dims(x, True))
        top = spec.max_batch_size
        opt = max(1, top // 2)
        lines.append(
            "optimization { execution_accelerators { gpu_execution_accelerator: [ {\n"
            '  name: "tensorrt"\n'
            '  parameters { key: "precision_mode" value: "FP16" }\n'
            '  parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n'
            '  parameters { key: "trt_engine_cache_enable" value: "1" }\n'
            f'  parameters {{ key: "trt_engine_cache_path" value: "{trt_cache}/{spec.name}" }}\n'
            f'  parameters {{ key: "trt_profile_min_shapes" value: "{x.name}:1x{static}" }}\n'
            f'  parameters {{ key: "trt_profile_opt_shapes" value: "{x.name}:{opt}x{static}" }}\n'
            f'  parameters {{ key: "trt_profile_max_shapes" value: "{x.name}:{top}x{static}" }}\n'
            "} ] } }"
        )
    # warm-up: the model is not READY before it ran once (ORT-TRT builds its engine here, not on a user)
    n_dyn = 16
    wb = (spec.max_batch_size if variant == "gpu" else 1) if batched else 0
    ins = []
    for t in spec.inputs:
        dims = ", ".join(str(d) for d in _warmup_dims(t, batched, n_dyn))
        data = "random_data: true" if t.dtype.startswith("float") or t.dtype == "uint8" else "zero_data: true"
        ins.append(
            f'  inputs {{ key: "{t.name}" value: {{ data_type: {TRITON_TYPES[t.dtype]} dims: [ {dims} ] {data} }} }}'
        )
    head = 'model_warmup [ {\n  name: "warmup"\n' + (f"  batch_size: {wb}\n" if batched else "")
    lines.append(head + "\n".join(ins) + "\n} ]")
    return "\n".join(lines) + "\n"


def write_model(root: Path, spec: ModelSpec, **kw) -> Path:
    mdir = root / spec.name
    (mdir / "configs").mkdir(parents=True, exist_ok=True)
    (mdir / "config.pbtxt").write_text(render_config(spec, "gpu", **kw))
    for variant in ("cpu", "cpu_python"):
        (mdir / "configs" / f"{variant}.pbtxt").write_text(render_config(spec, variant, **kw))
    vdir = root / Path(spec.file).parent
    if vdir.parent != mdir:
        raise ValueError(f"model file {spec.file} must be <name>/<version>/model.onnx for Triton")
    shutil.copyfile(PYTHON_MODEL, vdir / "model.py")
    return mdir


def write_repository(bundle: Bundle, **kw) -> list[Path]:
    """Configs (all variants) and the Python-backend `model.py` for every model of `bundle`."""
    return [write_model(bundle.root, spec, **kw) for spec in bundle.manifest.models]
