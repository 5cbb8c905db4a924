"""What this machine sustains on dense math through ONNX Runtime's CPU execution provider, measured
in the benchmark's own run with the served steps' thread count: the ceiling of the roofline.

Kernels, each a one-node ONNX graph run in the same runtime the served steps use:
- ``gemm``: MatMul of two n x n FP32 matrices (n = 2048 by default), 2 n^3 FLOPs per run;
- ``conv3x3``: a 3x3 convolution, 128 -> 128 channels on a 56 x 56 map, padding 1 (FP32);
- ``model_conv``: the model's own largest convolution (shape and attributes copied from the graph);
- with an INT8 repository also ``gemm_int8`` (MatMulInteger, uint8 x int8 -> int32, what MLAS runs
  with VNNI) and ``conv3x3_int8`` (QLinearConv), so INT8 steps are held against an INT8 ceiling.

Two levels, because the served pipeline runs one ONNX Runtime session per step instance, each with
``threads`` intra-op threads, several at once:
- ``step``: one session with ``threads`` threads (what one instance of a step can reach);
- ``machine``: ``copies`` such sessions running at the same time from as many Python threads
  (ONNX Runtime releases the GIL), copies = cores // threads: what the pipeline can reach when every
  core is busy. With threads = 0 (ONNX Runtime: all cores) both levels are one session.

The ceiling of a precision and level is the **fastest kernel** there (the max over kernels; the
machine level takes the max over both levels).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from promptmad.benchmarks.perf_analyzer import BenchError

GEMM_N = 2048
CONV3X3 = (128, 56)  # channels, map side


@dataclass(frozen=True)
class Kernel:
    """One dense-math probe: a serialized one-node ONNX graph, its input feed and FLOPs per run."""

    name: str
    precision: str  # "fp32" or "int8"
    onnx: bytes
    feeds: dict
    flops: int
    shape: str  # for the report, e.g. "2048x2048x2048"


@dataclass
class Ceiling:
    """Measured GFLOP/s per kernel and level, and the resulting ceilings."""

    threads: int
    copies: int
    seconds: float
    kernels: list[dict] = field(default_factory=list)  # {kernel, precision, shape, level, threads, copies, runs, gflops_per_s}

    def best(self, precision: str, level: str) -> float:
        """The ceiling: the fastest kernel of ``precision`` at ``level`` (NaN if none was measured); the
        machine level also counts the one-session figures (the cores can always do what one session did)."""
        levels = ("step", "machine") if level == "machine" else (level,)
        vals = [k["gflops_per_s"] for k in self.kernels if k["precision"] == precision and k["level"] in levels]
        return max(vals) if vals else math.nan

    def as_dict(self) -> dict:
        precisions = sorted({k["precision"] for k in self.kernels})
        return {"threads": self.threads, "copies": self.copies, "seconds_per_kernel": self.seconds, "kernels": self.kernels,
                "ceiling_gflops_per_s": {p: {lvl: self.best(p, lvl) for lvl in ("step", "machine")} for p in precisions}}


# --- kernels ------------------------------------------------------------------------------------------

def _model(node, inputs, outputs, inits) -> bytes:
    import onnx
    from onnx import helper

    graph = helper.make_graph([node], node.op_type.lower(), inputs, outputs, initializer=inits)
    # opset 17 and IR 8: what the exported graphs use, and what this onnxruntime loads
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def gemm_kernel(n: int = GEMM_N) -> Kernel:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "b")
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    onnx_bytes = _model(node, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [b])
    return Kernel("gemm", "fp32", onnx_bytes, {"a": rng.standard_normal((n, n), dtype=np.float32)}, 2 * n ** 3, f"{n}x{n}x{n}")


def conv_kernel(x_shape, w_shape, attributes: dict | None = None, name: str = "conv3x3") -> Kernel:
    """An FP32 Conv of input ``x_shape`` (NCHW) and weight ``w_shape``; ``attributes`` as in ONNX
    (default: padding 1 on every side, stride 1)."""
    from onnx import TensorProto, helper, numpy_helper

    attrs = dict(attributes if attributes is not None else {"pads": [1, 1, 1, 1]})
    attrs.pop("kernel_shape", None)  # taken from the weight
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal(w_shape, dtype=np.float32) * 0.05, "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    onnx_bytes = _model(node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    y_shape = _conv_out(onnx_bytes, x_shape)
    flops = 2 * math.prod(y_shape) * math.prod(w_shape[1:])
    shape = f"{'x'.join(map(str, x_shape))} * {'x'.join(map(str, w_shape))}"
    return Kernel(name, "fp32", onnx_bytes, {"x": rng.standard_normal(x_shape, dtype=np.float32)}, flops, shape)


def conv3x3_kernel(channels: int = CONV3X3[0], side: int = CONV3X3[1]) -> Kernel:
    return conv_kernel((1, channels, side, side), (channels, channels, 3, 3))


def _conv_out(onnx_bytes: bytes, x_shape) -> tuple[int, ...]:
    import onnx

    m = onnx.shape_inference.infer_shapes(onnx.load_from_string(onnx_bytes))
    dims = m.graph.output[0].type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims):
        raise BenchError(f"conv kernel on input {list(x_shape)}: output shape not inferable; check the copied attributes")
    return tuple(d.dim_value for d in dims)


def gemm_int8_kernel(n: int = GEMM_N) -> Kernel:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "b")
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    onnx_bytes = _model(node, [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [b])
    return Kernel("gemm_int8", "int8", onnx_bytes, {"a": rng.integers(0, 256, (n, n), dtype=np.uint8)}, 2 * n ** 3,
                  f"{n}x{n}x{n}")


def conv3x3_int8_kernel(channels: int = CONV3X3[0], side: int = CONV3X3[1]) -> Kernel:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f32, u8, i8 = np.float32, np.uint8, np.int8
    inits = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
             (("xs", 0.02, f32), ("xz", 128, u8), ("ws", 0.01, f32), ("wz", 0, i8), ("ys", 0.05, f32), ("yz", 128, u8))]
    inits.append(numpy_helper.from_array(rng.integers(-127, 128, (channels, channels, 3, 3), dtype=i8), "w"))
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1])
    x_shape = (1, channels, side, side)
    onnx_bytes = _model(node, [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x_shape))],
                        [helper.make_tensor_value_info("y", TensorProto.UINT8, list(x_shape))], inits)
    flops = 2 * side * side * channels * channels * 9
    return Kernel("conv3x3_int8", "int8", onnx_bytes, {"x": rng.integers(0, 256, x_shape, dtype=u8)}, flops,
                  f"{'x'.join(map(str, x_shape))} * {channels}x{channels}x3x3")


# --- measuring ----------------------------------------------------------------------------------------

def _session(kernel: Kernel, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # as the served steps: model_repository/onnx_runner.py
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(kernel.onnx, opts, providers=["CPUExecutionProvider"])


def measure_kernel(kernel: Kernel, threads: int, copies: int = 1, seconds: float = 2.0, warmup: int = 2) -> dict:
    """GFLOP/s of ``copies`` sessions (``threads`` intra-op threads each) running ``kernel`` at the
    same time for about ``seconds`` (each at least one timed run), after ``warmup`` runs each."""
    sessions = [_session(kernel, threads) for _ in range(copies)]
    for s in sessions:
        for _ in range(warmup):
            s.run(None, kernel.feeds)
    runs = [0] * copies
    ends = [0.0] * copies
    start = threading.Barrier(copies + 1)

    def loop(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        while True:
            sessions[i].run(None, kernel.feeds)
            runs[i] += 1
            ends[i] = time.perf_counter()
            if ends[i] - t0 >= seconds:
                return

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(copies)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    wall = max(ends) - t0
    return {"kernel": kernel.name, "precision": kernel.precision, "shape": kernel.shape, "threads": threads,
            "copies": copies, "runs": sum(runs), "seconds": wall, "gflops_per_s": kernel.flops * sum(runs) / wall / 1e9}


def copies_for(threads: int, cores: int) -> int:
    """Sessions that fill ``cores`` when each has ``threads`` intra-op threads (0 = all cores)."""
    return 1 if threads <= 0 else max(1, cores // threads)


def measure_ceiling(threads: int, cores: int, *, seconds: float = 2.0, kernels: list[Kernel] | None = None,
                    int8: bool = False, gemm_n: int = GEMM_N) -> Ceiling:
    """Every kernel at the ``step`` level (one session) and, when more than one session fits the
    cores, at the ``machine`` level (``copies_for(threads, cores)`` sessions at once)."""
    if threads < 0 or cores < 1 or seconds <= 0:
        raise BenchError(f"ceiling: threads {threads} (>= 0), cores {cores} (>= 1), seconds {seconds} (> 0)")
    if kernels is None:
        kernels = [gemm_kernel(gemm_n), conv3x3_kernel()]
    if int8:
        kernels = [*kernels, gemm_int8_kernel(gemm_n), conv3x3_int8_kernel()]
    copies = copies_for(threads, cores)
    out = Ceiling(threads, copies, seconds)
    for k in kernels:
        step = measure_kernel(k, threads, 1, seconds)
        out.kernels.append({**step, "level": "step"})
        machine = measure_kernel(k, threads, copies, seconds) if copies > 1 else step
        out.kernels.append({**machine, "level": "machine"})
    return out
