"""The fused layout of a python-ort repository: the visual encoder, reconstructor and segmentor graphs
merged into one ONNX graph served as one step (`contract.FUSED_ENGINE`), so a frame makes 4 hops through
the ensemble instead of 6 (each hop: a Python-backend stub round trip and the tensors copied through
shared memory). The ensembles keep their names, inputs, outputs, class bank, preprocess and postprocess
(`contract.FUSED_ENSEMBLES`): clients cannot tell.

Why a graph merge and not a re-export from the torch modules: a repository is all this needs (no
checkpoint), and the merged graph runs the very nodes and weights of the three exported graphs, so it
computes what the chain computes (up to ONNX Runtime optimising across the former boundaries). Each
graph's internal names get its step's prefix (the exporter names them alike: `/m/Conv_output_0`,
`onnx::Conv_981`); contract tensor names stay, which wires the graphs together by name as the ensemble
did.

Fail closed as the chain did: each step refused a request whose outputs were not finite, and a NaN in
an intermediate tensor (feat*, recon16) need not reach the segmentor's outputs (a max or a clip can drop
it). The merged graph adds 0 * every intermediate (summed per item) to anomaly_score: +0 for finite
values, NaN for NaN/inf, so the runner (onnx_runner.py) refuses that request naming `fused_engine`.
The multiply comes before the sum, so large finite features cannot overflow into a false refusal.

The GPU (TensorRT) layout stays the ensemble of engines: only python-ort repositories are fused.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path
from typing import Mapping

from promptmad import contract
from promptmad.errors import ExportError

FUSED = contract.FUSED_ENGINE
# Instances of the fused step: two keep both cores of the 2-core machines of benchmarks/README.md busy when
# frames are in flight together, as the step layout's two segmentor instances do. `fuse_repository(instances=...)`
# and `promptmad bench-variants` change it.
FUSED_INSTANCES = 2
# ONNX Runtime threads of each fused instance: every core for a frame computed alone, the cores split among
# the instances computing together (model_repository/onnx_runner.py). On the 2-core AMD EPYC Zen 5 of
# benchmarks/README.md ("`auto` threads"): 1.5x the frames/s of one thread each at concurrency 1, 0.96-1.0x at the
# best concurrency; on a bigger server the instances use every core instead of one each.
FUSED_THREADS = contract.ORT_THREADS_AUTO
GUARD_PREFIX = f"{FUSED.name}/finite_guard/"
_CONTRACT_TENSORS = {t.name: t for s in contract.FUSED_FROM for t in (*s.inputs, *s.outputs)}


def _prefixed_graph(model, step: contract.Step):
    """The step's graph with every internal name (nodes, edges, initializers) prefixed `<step>/`;
    its inputs and outputs keep their contract names."""
    from onnx.compose import add_prefix_graph

    return add_prefix_graph(model.graph, f"{step.name}/", rename_inputs=False, rename_outputs=False)


def _check_sources(graphs: Mapping[str, object]) -> None:
    missing = [s.name for s in contract.FUSED_FROM if s.name not in graphs]
    if missing:
        raise ExportError(f"fusing needs the graphs of {[s.name for s in contract.FUSED_FROM]}; missing {missing}")
    opsets = {s.name: {(o.domain, o.version) for o in graphs[s.name].opset_import} for s in contract.FUSED_FROM}
    if len({frozenset(v) for v in opsets.values()}) != 1:
        raise ExportError(f"the engine graphs were exported with different opsets {opsets}; re-export them together "
                          "(`promptmad export`) before fusing")
    with_functions = [s.name for s in contract.FUSED_FROM if len(graphs[s.name].functions)]
    if with_functions:
        raise ExportError(f"{with_functions[0]}: its graph has local functions, which fusing does not merge; re-export it")
    for step in contract.FUSED_FROM:
        g = graphs[step.name].graph
        got = ([i.name for i in g.input], [o.name for o in g.output])
        if got != (list(step.input_names), list(step.output_names)):
            raise ExportError(f"{step.name}: graph inputs/outputs {got} are not the contract's "
                              f"{(list(step.input_names), list(step.output_names))}; re-export the repository")


def _guard_nodes(intermediates: list[str], score_in: str, score_out: str) -> tuple[list, list]:
    """(nodes, initializers) making `score_out` = `score_in` + per item sum(0 * each intermediate)."""
    import numpy as np
    from onnx import helper, numpy_helper

    p = GUARD_PREFIX
    inits = [numpy_helper.from_array(np.zeros((), np.float32), p + "zero"),
             numpy_helper.from_array(np.array([1], np.int64), p + "item_axis")]
    nodes, sums = [], []
    for name in intermediates:
        rank = 1 + len(_CONTRACT_TENSORS[name].dims)  # batch + per-item dims
        inits.append(numpy_helper.from_array(np.arange(1, rank, dtype=np.int64), p + f"{name}_axes"))
        nodes += [helper.make_node("Mul", [name, p + "zero"], [p + f"{name}_x0"], name=p + f"{name}_mul"),
                  helper.make_node("ReduceSum", [p + f"{name}_x0", p + f"{name}_axes"], [p + f"{name}_sum"],
                                   name=p + f"{name}_sum", keepdims=0)]
        sums.append(p + f"{name}_sum")
    nodes += [helper.make_node("Sum", sums, [p + "total"], name=p + "total"),
              helper.make_node("Unsqueeze", [p + "total", p + "item_axis"], [p + "per_item"], name=p + "per_item"),
              helper.make_node("Add", [score_in, p + "per_item"], [score_out], name=p + "add")]
    return nodes, inits


def merge_engine_graphs(graphs: Mapping[str, object]):
    """One ONNX model computing `contract.FUSED_ENGINE` from the graphs of `contract.FUSED_FROM`
    (step name -> onnx.ModelProto): their nodes in execution order, wired by contract tensor name, the
    external inputs once each in the contract's order, the segmentor's outputs, and the finite guard."""
    import onnx
    from onnx import helper

    _check_sources(graphs)
    parts = {s.name: _prefixed_graph(graphs[s.name], s) for s in contract.FUSED_FROM}
    made = set()  # tensors produced by an earlier graph of the chain
    inputs, nodes, inits = {}, [], []
    for step in contract.FUSED_FROM:
        g = parts[step.name]
        inputs.update({i.name: i for i in g.input if i.name not in made and i.name not in inputs})
        nodes += g.node
        inits += g.initializer
        made |= set(step.output_names)
    if set(inputs) != set(FUSED.input_names):
        raise ExportError(f"the merged graph takes {sorted(inputs)}, the contract's {FUSED.name} {sorted(FUSED.input_names)}; "
                          "promptmad.contract.FUSED_ENGINE and the engine steps disagree")
    last = contract.FUSED_FROM[-1]
    score = contract.ANOMALY_SCORE.name
    raw_score = f"{last.name}/{score}"
    for node in nodes:  # the segmentor's score becomes the guard's input; the guard makes the output
        node.output[:] = [raw_score if o == score else o for o in node.output]
        node.input[:] = [raw_score if i == score else i for i in node.input]
    intermediates = [t for s in contract.FUSED_FROM[:-1] for t in s.output_names]
    guard, guard_inits = _guard_nodes(intermediates, raw_score, score)
    outputs = {o.name: o for o in parts[last.name].output}
    graph = helper.make_graph(nodes + guard, FUSED.name, [inputs[n] for n in FUSED.input_names],
                              [outputs[n] for n in FUSED.output_names], initializer=inits + guard_inits)
    first = graphs[contract.FUSED_FROM[0].name]
    model = helper.make_model(graph, opset_imports=list(first.opset_import), producer_name="promptmad.export.fused",
                              doc_string=f"{' + '.join(s.name for s in contract.FUSED_FROM)} merged (export/fused.py)")
    model.ir_version = max(g.ir_version for g in graphs.values())
    onnx.checker.check_model(model)
    return model


def fused_config(stage: Path, instances: int, threads: int | str = FUSED_THREADS):
    """The fused step's config: the exported segmentor's (backend, runner parameters, batching) with the
    contract's inputs and outputs as the engine steps declared them, `instances` instances of `threads`
    ONNX Runtime threads and a zero warm-up batch of its own inputs."""
    from promptmad.export.repository import add_zero_warmup, check_ort_threads
    from promptmad.export.repository_edit import read_config

    sources = {s.name: read_config(stage / s.name / "config.pbtxt") for s in contract.FUSED_FROM}
    cfg = type(sources[contract.SEGMENTOR.name])()
    cfg.CopyFrom(sources[contract.SEGMENTOR.name])
    declared_in = {i.name: i for c in sources.values() for i in c.input}
    declared_out = {o.name: o for o in sources[contract.FUSED_FROM[-1].name].output}
    cfg.name = FUSED.name
    del cfg.input[:], cfg.output[:], cfg.model_warmup[:], cfg.instance_group[1:]
    cfg.input.extend(declared_in[n] for n in FUSED.input_names)
    cfg.output.extend(declared_out[n] for n in FUSED.output_names)
    cfg.instance_group[0].count = instances
    check_ort_threads(threads)
    cfg.parameters[contract.PARAM_ORT_THREADS].string_value = str(threads)
    add_zero_warmup(cfg)
    return cfg


def _check_stage(stage: Path) -> None:
    from promptmad.export.repository_edit import read_config

    if (stage / FUSED.name).is_dir():
        raise ExportError(f"{stage}: already in the fused layout ({FUSED.name}/ is there)")
    params = read_config(stage / contract.MODEL_NAME / "config.pbtxt").parameters
    runtime = params[contract.PARAM_RUNTIME].string_value if contract.PARAM_RUNTIME in params else "?"
    if runtime != "python-ort":
        raise ExportError(f"runtime {runtime!r}: only python-ort repositories are fused (the GPU layouts stay the "
                          "ensemble of engines); export with --runtime python-ort")


def fuse_stage(stage: Path, manifest: dict, *, instances: int = FUSED_INSTANCES,
               threads: int | str = FUSED_THREADS) -> dict:
    """Turns the repository at `stage` (an edit copy: files are replaced, never written into) into the
    fused layout and returns its manifest, to be sealed. Used through :func:`fuse_repository`."""
    import onnx

    from promptmad.export.repository import latest_version
    from promptmad.export.repository_edit import read_config, replace_file, write_config

    stage = Path(stage)
    if instances < 1:
        raise ExportError(f"instances {instances}: the fused step needs at least 1 instance")
    _check_stage(stage)
    graphs = {s.name: onnx.load(str(latest_version(stage / s.name) / contract.ONNX_FILE)) for s in contract.FUSED_FROM}
    version = stage / FUSED.name / "1"
    version.mkdir(parents=True)
    replace_file(version / contract.ONNX_FILE, merge_engine_graphs(graphs).SerializeToString())
    shutil.copy2(latest_version(stage / contract.SEGMENTOR.name) / "model.py", version / "model.py")  # the ONNX Runtime runner
    write_config(stage / FUSED.name / "config.pbtxt", fused_config(stage, instances, threads))
    for ensemble in contract.FUSED_ENSEMBLES:
        path = stage / ensemble.name / "config.pbtxt"
        cfg = read_config(path)
        del cfg.ensemble_scheduling.step[:]
        for step in ensemble.steps:
            s = cfg.ensemble_scheduling.step.add()
            s.model_name, s.model_version = step.name, -1
            s.input_map.update({n: n for n in step.input_names})
            s.output_map.update({n: n for n in step.output_names})
        write_config(path, cfg)
    checksums = manifest.get("artifacts_sha256", {})
    fused_from = {s.name: checksums.get(f"{s.name}/1/{contract.ONNX_FILE}") for s in contract.FUSED_FROM}
    for step in contract.FUSED_FROM:
        shutil.rmtree(stage / step.name)  # in an edit copy: directory entries of hard links only
    return {**manifest, "layout": "fused", "fused_from_sha256": fused_from, "fused_instances": instances,
            "fused_threads": threads}


def fuse_repository(repo: str | Path, *, instances: int = FUSED_INSTANCES, threads: int | str = FUSED_THREADS) -> dict:
    """Converts an exported python-ort repository into the fused layout, in place and atomically (the
    edit machinery of `promptmad classes`: verified first, sealed again, swapped in one step); returns
    the new manifest. For a fused copy, copy the repository first (`shutil.copytree`)."""
    from promptmad.export.repository_edit import edit_repository

    return edit_repository(repo, partial(fuse_stage, instances=instances, threads=threads))


def layout(repo: str | Path) -> str:
    """"fused" or "steps": which of contract.LAYOUTS the repository at `repo` is in."""
    return contract.LAYOUTS[1] if (Path(repo) / FUSED.name).is_dir() else contract.LAYOUTS[0]
