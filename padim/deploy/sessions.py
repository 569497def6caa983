"""The engines' sessions: an export's graph loaded by ONNX Runtime or OpenVINO, with this session's
threads (never process-wide settings), its signature checked against the model's input size, and
every failure of the engine one line. Torch-free. A new engine is another session class here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from padim.deploy.export_folder import INPUT_NAME, OUTPUT_NAMES, EngineError
from padim.errors import one_line

ENGINES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16", "int8")  # int8: an int8 export (padim.deploy.quantize), OpenVINO only
RUNTIME_INSTALL_HINT = {"onnxruntime": 'pip install onnxruntime (with padim and torch: pip install "padim-inspect[runtime]")',
                        "openvino": 'pip install openvino (with padim and torch: pip install "padim-inspect[openvino]")'}


def _import_engine(engine: str):
    try:
        return __import__(engine)
    except ImportError:
        raise EngineError(f"`engine` {engine} needs the package {engine!r}: {RUNTIME_INSTALL_HINT[engine]}") from None


class _OnnxRuntimeSession:
    """ONNX Runtime on the CPU, its graph optimisation at the highest level (``ORT_ENABLE_ALL``:
    the NCHWc layout, fusions). ``threads``: intra-op threads of this session's own pool (None:
    ORT's default, one per physical core); nothing process-wide is set."""

    def __init__(self, path: Path, precision: str, threads: Optional[int]):
        if precision != "f32":
            raise EngineError(f"`precision` {precision} is not available with onnxruntime (only f32); "
                              "use `engine` openvino for bf16")
        ort = _import_engine("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # layout (NCHWc) and fusions
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of operations: no inter-op pool
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = int(threads)  # this session's own pool; nothing process-wide
        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EngineError(f"onnxruntime cannot load {path}: {one_line(exc, last=True, typed=False)}") from None
        self.input_name = self.session.get_inputs()[0].name

    def signature(self):
        """[(name, dims, dtype)] of the inputs and of the outputs; None for a dynamic dimension."""
        def ports(values):
            return [(port.name, [d if type(d) is int else None for d in (port.shape or [])],
                     _DTYPES.get(port.type, port.type)) for port in values]

        return ports(self.session.get_inputs()), ports(self.session.get_outputs())

    def __call__(self, pixels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        try:
            maps, scores = self.session.run(list(OUTPUT_NAMES), {self.input_name: pixels})
        except Exception as exc:  # a graph that takes the declared input but cannot run on it
            raise EngineError(f"onnxruntime cannot score with {self.path}: {one_line(exc, last=True, typed=False)}") from None
        return maps, scores


class _OpenVinoSession:
    """OpenVINO on the CPU, inference precision as asked (never chosen for the user: OpenVINO
    defaults to bf16 on CPUs that have it, which moves maps by ~1e-2). Dynamic quantisation of the
    matrix products is off (it would be a reduced precision nobody asked for) and so is thread
    pinning (affinity is the host process's business). int8: an int8 graph (its quantised
    convolutions run in int8) whose other operations run in f32, as they were calibrated."""

    def __init__(self, path: Path, precision: str, threads: Optional[int]):
        ov = _import_engine("openvino")
        core = ov.Core()
        if precision == "bf16":
            capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if "BF16" not in capabilities:
                raise EngineError(f"`precision` bf16: this CPU has no bf16 support (OpenVINO reports "
                                  f"{', '.join(capabilities)}); use f32")
        config = openvino_config(precision, threads)
        self.path = path
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            self.request = self.compiled.create_infer_request()
        except Exception as exc:  # e.g. a truncated model.bin: "Incorrect weights in bin file!"
            raise EngineError(f"openvino cannot load {path}: {one_line(exc, last=True, typed=False)}") from None

    def signature(self):
        """[(name, dims, dtype)] of the inputs and of the outputs; None for a dynamic dimension."""
        def ports(values):
            found = []
            for port in values:
                shape = port.get_partial_shape()
                dims = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else []
                name = next((n for n in (INPUT_NAME,) + OUTPUT_NAMES if n in port.get_names()), port.get_any_name())
                type_name = port.get_element_type().get_type_name()
                found.append((name, dims, _DTYPES.get(type_name, type_name)))
            return found

        return ports(self.compiled.inputs), ports(self.compiled.outputs)

    def __call__(self, pixels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        try:
            results = self.request.infer({0: pixels})
        except Exception as exc:  # a graph that takes the declared input but cannot run on it
            raise EngineError(f"openvino cannot score with {self.path}: {one_line(exc, last=True, typed=False)}") from None
        outputs = {output.get_any_name(): value for output, value in results.items()}
        return np.array(outputs["maps"]), np.array(outputs["scores"])  # copies: the request reuses its buffers


def openvino_config(precision: str, threads: Optional[int] = None) -> dict:
    """The compile settings of an OpenVINO session (see ``_OpenVinoSession``): int8 graphs run their
    other operations in f32."""
    config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision,
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0, "ENABLE_CPU_PINNING": False, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


# the engines' element type names -> NumPy's
_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "u8": "uint8", "f32": "float32"}


def check_signature(session, folder, input_size: Tuple[int, int]) -> None:
    """The open graph's actual input and outputs against what an export of an (H, W) model has:
    pixels (batch, H, W, 3) uint8 -> maps (batch, H, W), scores (batch,) float32, batch dynamic."""
    height, width = input_size
    want = ([(INPUT_NAME, [None, height, width, 3], "uint8")],
            [("maps", [None, height, width], "float32"), ("scores", [None], "float32")])
    inputs, outputs = session.signature()
    if (inputs, sorted(outputs, key=repr)) != want:
        shown = "; ".join(f"{name} {dims} {dtype}" for name, dims, dtype in inputs + outputs)
        raise EngineError(f"export {folder}: its graph ({shown}; None: any size) is not the scoring graph of a "
                          f"{height}x{width} model: replaced or damaged; export again ('padim export')")


def check_precision(folder, record: dict, precision: str) -> None:
    """An int8 graph is opened with `precision` int8 only, and `precision` int8 opens int8 graphs only:
    an int8 export's thresholds were computed with its int8 scores, an f32 one's with f32 scores."""
    made = record.get("precision", "f32")  # what the graph is: f32 (bf16 is an engine setting) or int8
    if precision == "int8" and made != "int8":
        raise EngineError(f"`precision` int8 needs an int8 export ('padim export --precision int8' with the model's "
                          f"training data); export {folder} is f32")
    if made == "int8" and precision != "int8":
        raise EngineError(f"export {folder} is an int8 graph (its thresholds were computed with it): open it with "
                          "`precision` int8")


def open_session(folder, record: dict, engine: str, precision: str = "f32", threads: Optional[int] = None):
    """A callable (B, H, W, 3) uint8 -> maps (B, H, W) float32, scores (B,) float32 for an export."""
    if engine not in ENGINES[1:]:
        raise EngineError(f"engine must be one of {', '.join(ENGINES[1:])} for an export, got {engine!r}")
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    graph = Path(folder) / record["graph"]
    check_precision(folder, record, precision)
    if engine == "onnxruntime":
        if record.get("graph_format") != "onnx":
            raise EngineError(f"export {folder} is OpenVINO IR; onnxruntime needs an ONNX export "
                              "(padim export `format` onnx)")
        return _OnnxRuntimeSession(graph, precision, threads)
    return _OpenVinoSession(graph, precision, threads)
