"""INT8 engine steps: ONNX Runtime static quantization in QDQ format of the visual encoder, the
reconstructor and the segmentor, with a per-block sensitivity sweep that decides what stays float.

Format: QuantizeLinear/DequantizeLinear pairs around the quantized ops (QuantFormat.QDQ), weights int8
symmetric per output channel, no reduce_range (a VNNI CPU accumulates without the VPMADDUBSW saturation
it works around). Activations, by runtime (QuantizeConfig.activation_type "auto"):
- CPU (python-ort, onnxruntime): uint8, asymmetric (U8S8), what ORT 1.32's quantize_static guide advises
  for x86 with VNNI. Measured on the default segmentor (AMD EPYC Zen 4, AVX-512 VNNI, ORT 1.32, one
  thread): ORT fuses 50 of its 52 quantized Convs into QLinearConv with U8S8, only 14 with S8S8 (the rest
  run DQ -> fp32 Conv -> Q), so S8S8 ran 1.4x slower than fp32 and U8S8 1.1x faster.
- tensorrt: int8 symmetric (S8S8, zero point 0), the only form TensorRT's explicit quantization takes
  (also ORT's generic QDQ default).
Biases stay float (QuantizeBias off): TensorRT refuses INT32 DequantizeLinear, and ONNX Runtime
quantizes a float bias itself when it fuses the QDQ groups.

The sweep (cheap: one quantization and one held-out run per block, the calibration run once per step):
1. the candidates are the ops that carry the FLOPs (QUANTIZED_OP_TYPES), grouped into blocks by module
   path (`body/blocks.3`, `encoder.0/attn`, `denoiser/body`: the unrolled diffusion steps share one);
2. each block alone is quantized and the served map of the held-out frames (the fp32 chain downstream)
   is compared with fp32: RMS in normal standard deviations; a block over block_tolerance stays float;
3. the whole INT8 chain is measured; while it is over map_tolerance, the worst remaining block goes
   back to float. Every number and the reason of every exclusion go into the manifest.
The calibration ranges of a step are computed once into the export's scratch folder (removed with it).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptmad import contract
from promptmad.errors import ExportError
from promptmad.export.calibration import QuantizeConfig, make_reader, resolve_activation_type, step_feeds
from promptmad.export.onnx_export import Tolerance

log = logging.getLogger(__name__)

# the ops the sweep decides about: they carry the FLOPs (convolutions, linear layers, attention products)
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# quantized after a quantized op (ORT's quantizer skips one whose input stays float), so the activation
# folds into the int8 group (EfficientNet-Lite's ReLU6 is a Clip). Add is not carried: most Adds of
# these graphs are bias, residual or DDIM arithmetic, where an int8 output only adds error.
CARRIED_OP_TYPES = ("Clip", "Relu")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# INT8 graph vs fp32 PyTorch, each step on PyTorch's own inputs (onnx_export.check_parity's rule: max
# |error| <= atol * max(1, max|ref|) + rtol * max|ref| when rtol > 0, else <= atol). An int8 activation
# has 255 levels over its calibrated range, so features carry a few percent of their peak; the map is
# in normal standard deviations (thresholds 7-10) and its worst pixel moves by about a unit. These
# catch a broken graph (a wrong scale, a quantized distance); the ranking is judged by the quality gate
# (export/quality_gate.py: P-/I-AUROC, P-AP, AUPRO against the served fp32 repository).
INT8_FEATURE_RTOL = 0.25
INT8_MAP_RTOL = 0.15
INT8_PARITY_TOLERANCES = {
    **{t.name: Tolerance(0.0, INT8_FEATURE_RTOL) for t in contract.VISUAL_ENCODER.outputs},
    contract.RECON16.name: Tolerance(0.0, INT8_FEATURE_RTOL),
    contract.ANOMALY_MAP_MODEL.name: Tolerance(0.0, INT8_MAP_RTOL),
    contract.ANOMALY_SCORE.name: Tolerance(0.0, INT8_MAP_RTOL),
}
_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
_UNROLLED = re.compile(r"_\d+$")  # the tracer's suffix of a module called again (unrolled diffusion steps)


def node_block(name: str, depth: int) -> str:
    """Block of a node: the first `depth` components of its module path, unroll suffixes removed
    ('/m/denoiser/body/body.0/body.0.0_3/Conv' -> 'denoiser/body' at depth 2); a node at the top
    level is a block of its own."""
    parts = name.strip("/").split("/")
    if parts and parts[0] == "m":  # the _StepGraph wrapper's attribute
        parts = parts[1:]
    path = [_UNROLLED.sub("", p) for p in parts[:-1]]
    return "/".join(path[:depth]) if path else name


def candidate_blocks(path: Path, depth: int) -> dict[str, list[str]]:
    """{block: node names} of the graph's QUANTIZED_OP_TYPES nodes, in graph order."""
    import onnx

    blocks: dict[str, list[str]] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in QUANTIZED_OP_TYPES:
            blocks.setdefault(node_block(node.name, depth), []).append(node.name)
    return blocks


def _carried_nodes(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in CARRIED_OP_TYPES]


def quantize_graph(fp32_path: Path, out_path: Path, cfg: QuantizeConfig, *, cache: Path,
                   feeds: list[dict[str, np.ndarray]] | None = None, quantize: list[str] | None = None,
                   exclude: list[str] | None = None) -> Path:
    """QDQ copy of `fp32_path`: every QUANTIZED_OP_TYPES node but `exclude` (or only `quantize`, with
    the carried ops). The ranges come from `cache`, computed from `feeds` the first time."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    activation = resolve_activation_type(cfg.activation_type, contract.DEFAULT_RUNTIME)  # the pipeline resolves per runtime
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[activation]
    extra = {"ActivationSymmetric": activation == "int8", "WeightSymmetric": True, "QuantizeBias": False,
             "CalibPercentile": cfg.percentile}
    nodes = None
    if quantize is not None:  # the sweep: one block, and the glue around it
        nodes = list(quantize) + _carried_nodes(fp32_path)
    if feeds is None and not cache.is_file():
        raise ExportError(f"{fp32_path.name}: no calibration ranges yet and no frames to compute them")
    with _quiet_root_logger():  # ORT's quantizer warns through the root logger about pre-processing
        quantize_static(
            str(fp32_path), str(out_path), make_reader(feeds) if feeds else None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=[*QUANTIZED_OP_TYPES, *CARRIED_OP_TYPES], per_channel=cfg.per_channel, reduce_range=False,
            activation_type=qtype, weight_type=QuantType.QInt8, nodes_to_quantize=nodes, nodes_to_exclude=list(exclude or []),
            calibrate_method=getattr(CalibrationMethod, _METHODS[cfg.method]), extra_options=extra,
            calibration_cache_path=str(cache),
        )
    return out_path


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


class Chain:
    """The three engine steps in ONNX Runtime on a fixed batch of held-out frames: fp32 tensors once,
    then the map with one step swapped for a candidate graph (the others fp32)."""

    def __init__(self, fp32_paths: dict[str, Path], held: dict[str, np.ndarray]):
        self.fp32 = {s: _session(p) for s, p in fp32_paths.items()}
        self.ref = dict(held)  # frame + prompt-bank rows; the engine outputs are recomputed in ORT
        for step in contract.ENGINE_STEPS:
            self.ref.update(self._run(self.fp32[step], step, self.ref))

    @staticmethod
    def _run(session, step: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = contract.STEPS[step]
        outs = session.run(list(names.output_names), {n: tensors[n] for n in names.input_names})
        return dict(zip(names.output_names, outs))

    def map_with(self, step: str, path: Path) -> tuple[np.ndarray, dict[str, float]]:
        """(served map with `step` from `path`, relative RMS error of that step's own outputs)."""
        t = dict(self.ref)
        own = self._run(_session(path), step, t)
        t.update(own)
        for later in contract.ENGINE_STEPS[contract.ENGINE_STEPS.index(step) + 1:]:
            t.update(self._run(self.fp32[later], later, t))
        return t[contract.ANOMALY_MAP_MODEL.name], {k: relative_rms(v, self.ref[k]) for k, v in own.items()}

    def map_of(self, paths: dict[str, Path]) -> np.ndarray:
        t = dict(self.ref)
        for step in contract.ENGINE_STEPS:
            t.update(self._run(_session(paths[step]), step, t))
        return t[contract.ANOMALY_MAP_MODEL.name]

    def map_error(self, got: np.ndarray) -> float:
        """RMS difference with the fp32 map, in the map's units (normal standard deviations)."""
        return float(np.sqrt(np.mean((got.astype(np.float64) - self.ref[contract.ANOMALY_MAP_MODEL.name]) ** 2)))


def relative_rms(got: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(np.sqrt(np.mean((got - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-12))


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Decision:
    """What the sweep measured and decided, as written into manifest.json."""

    config: dict
    calibration_frames: int
    held_frames: int
    block_map_rms: dict[str, dict[str, float]] = field(default_factory=dict)  # step -> block -> map RMS
    excluded: dict[str, dict[str, str]] = field(default_factory=dict)  # step -> block -> reason
    excluded_nodes: dict[str, list[str]] = field(default_factory=dict)
    quantized_nodes: dict[str, int] = field(default_factory=dict)
    step_output_relative_rms: dict[str, dict[str, float]] = field(default_factory=dict)
    chain_map_rms: float = float("nan")
    sweep_seconds: float = 0.0

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"format": "QDQ", "weights": "int8 symmetric, per channel" if self.config["per_channel"] else "int8 symmetric",
                "activations": f"{self.config['activation_type']} " + ("symmetric" if self.config["activation_type"] == "int8" else "asymmetric"),
                "quantized_op_types": list(QUANTIZED_OP_TYPES), "carried_op_types": list(CARRIED_OP_TYPES),
                "map_rms_units": "normal standard deviations (the served map's units)", **asdict(self)}


def quantize_steps(fp32_paths: dict[str, Path], calib: dict[str, np.ndarray], held: dict[str, np.ndarray],
                   cfg: QuantizeConfig, workdir: Path) -> tuple[dict[str, Path], Decision]:
    """INT8 graph of every engine step, decided by the sweep; `calib` and `held`: the chain's tensors
    (onnx_export.reference_outputs) of the calibration and of the held-out frames."""
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    chain = Chain(fp32_paths, held)
    decision = Decision(cfg.to_dict(), len(calib[contract.FRAME.name]), len(held[contract.FRAME.name]))
    blocks = {s: candidate_blocks(p, cfg.block_depth) for s, p in fp32_paths.items()}
    caches = {s: workdir / f"{s}.ranges.json" for s in fp32_paths}
    for step, path in fp32_paths.items():
        feeds = step_feeds(calib, step)
        decision.block_map_rms[step] = {}
        for block, nodes in blocks[step].items():
            probe = quantize_graph(path, workdir / f"{step}.probe.onnx", cfg, cache=caches[step], feeds=feeds, quantize=nodes)
            decision.block_map_rms[step][block] = chain.map_error(chain.map_with(step, probe)[0])
        decision.excluded[step] = {b: f"alone moves the map by {e:.3g} RMS > block_tolerance {cfg.block_tolerance:g}"
                                   for b, e in decision.block_map_rms[step].items() if e > cfg.block_tolerance}
    paths = {s: _final(s, fp32_paths[s], blocks[s], decision, cfg, caches[s], workdir) for s in fp32_paths}
    decision.chain_map_rms = chain.map_error(chain.map_of(paths))
    for _ in range(cfg.max_budget_rounds):
        if decision.chain_map_rms <= cfg.map_tolerance:
            break
        worst = _worst_quantized(decision)
        if worst is None:
            break
        step, block = worst
        decision.excluded[step][block] = (f"chain map {decision.chain_map_rms:.3g} RMS > map_tolerance {cfg.map_tolerance:g}: "
                                          f"worst remaining block ({decision.block_map_rms[step][block]:.3g} alone)")
        paths[step] = _final(step, fp32_paths[step], blocks[step], decision, cfg, caches[step], workdir)
        decision.chain_map_rms = chain.map_error(chain.map_of(paths))
    for step, path in paths.items():
        decision.step_output_relative_rms[step] = chain.map_with(step, path)[1]
    decision.sweep_seconds = round(time.perf_counter() - start, 1)
    log.info("INT8 sweep: %s kept float, chain map RMS %.3g (%.0f s)",
             {s: sorted(e) for s, e in decision.excluded.items() if e}, decision.chain_map_rms, decision.sweep_seconds)
    return paths, decision


def _final(step: str, path: Path, blocks: dict[str, list[str]], decision: Decision, cfg: QuantizeConfig,
           cache: Path, workdir: Path) -> Path:
    excluded = [n for b in decision.excluded[step] for n in blocks[b]]
    decision.excluded_nodes[step] = excluded
    decision.quantized_nodes[step] = sum(map(len, blocks.values())) - len(excluded)
    return quantize_graph(path, workdir / f"{step}.int8.onnx", cfg, cache=cache, exclude=excluded)


def _worst_quantized(decision: Decision) -> tuple[str, str] | None:
    left = [(e, s, b) for s, errs in decision.block_map_rms.items() for b, e in errs.items() if b not in decision.excluded[s]]
    return max(left)[1:] if left else None


def check_tensorrt_qdq(path: Path) -> None:
    """TensorRT's explicit quantization takes INT8 Q/DQ with zero point 0 (and a float bias): raises
    ExportError naming the first node that is not."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is None:
            continue
        arr = numpy_helper.to_array(zp)
        if arr.dtype != np.int8 or np.any(arr != 0):
            raise ExportError(f"{path.name}: {node.op_type} {node.name!r} has a {arr.dtype} zero point "
                              f"{'!= 0' if arr.dtype == np.int8 else ''}; TensorRT needs symmetric int8 "
                              "(QuantizeConfig.activation_type 'int8')")


def count_qdq(path: Path) -> dict[str, int]:
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return {op: sum(n.op_type == op for n in nodes) for op in QDQ_OPS}
