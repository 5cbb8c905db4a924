"""Serving-layout variants of one exported repository, measured side by side in one run: the export's
default (the fused engine step, export/fused.py, without dynamic batching), the step layout with and
without dynamic batching, other engine-step instance counts.

Every variant is a copy of the same repository (same weights) changed through the edit machinery of
`promptmad classes` (verified, sealed again). All variants are served at once, each by its own server,
and measured in alternation (A B C D A B C D ...) with the client code of `promptmad bench`
(sweep.sweep_ensemble: perf_analyzer over gRPC on the same real frames), so drift of a shared machine
falls on every variant alike. Idle servers cost memory, not CPU (their stubs wait on a semaphore).
Per variant and round: served FPS at concurrency 1 and at the best concurrency, p50/p95 latency there;
the summary is the median over rounds and the median of the per-round ratios to the first variant.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from promptmad import contract
from promptmad.benchmarks.perf_analyzer import BenchError

log = logging.getLogger(__name__)

KEEP = None  # a Variant field left as exported


@dataclass(frozen=True)
class Variant:
    """A serving configuration, whatever the source repository's: `layout` (contract.LAYOUTS), `batching`
    (Triton's dynamic batcher on every python-ort step, as the templates set it, or none) and
    `engine_instances` (instances of every engine step, the fused one included; KEEP: the export's).
    Built from a step-layout repository: the fused layout is made from its three graphs."""

    name: str
    layout: str = "steps"
    batching: bool = True
    engine_instances: int | None = KEEP
    ort_threads: int | str | None = KEEP  # ONNX Runtime intra-op threads of each engine instance, or "auto"
    spinning: bool | None = KEEP  # ONNX Runtime's thread pool spins between ops (its default) or sleeps
    engine: str | None = KEEP  # what runs the engine graphs (contract.ENGINES), OpenVINO's precision below
    inference_precision: str | None = KEEP  # contract.INFERENCE_PRECISIONS: bf16 changes the numbers (int8-gate)

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise BenchError(f"variant name {self.name!r}: give a plain folder name, e.g. 'fused'")
        if self.layout not in contract.LAYOUTS:
            raise BenchError(f"variant {self.name}: layout {self.layout!r}, choose one of {', '.join(contract.LAYOUTS)}")
        if self.engine_instances is not None and not 1 <= self.engine_instances <= 16:
            raise BenchError(f"variant {self.name}: engine_instances {self.engine_instances}, give 1..16 (or leave it as exported)")
        if (self.ort_threads is not None and self.ort_threads != contract.ORT_THREADS_AUTO
                and not (isinstance(self.ort_threads, int) and 1 <= self.ort_threads <= 64)):
            raise BenchError(f"variant {self.name}: ort_threads {self.ort_threads!r}, give 1..64 or "
                             f"'{contract.ORT_THREADS_AUTO}' (or leave it as exported)")
        if self.engine is not None and self.engine not in contract.ENGINES:
            raise BenchError(f"variant {self.name}: engine {self.engine!r}, choose one of {', '.join(contract.ENGINES)}")
        if self.inference_precision is not None and (self.engine != contract.ENGINES[1]
                                                     or self.inference_precision not in contract.INFERENCE_PRECISIONS):
            raise BenchError(f"variant {self.name}: inference_precision {self.inference_precision!r} needs engine "
                             f"{contract.ENGINES[1]} and one of {', '.join(contract.INFERENCE_PRECISIONS)}")


PRESETS = {v.name: v for v in (
    Variant("default", layout="fused", batching=False),  # what `promptmad export` gives for python-ort (auto threads)
    Variant("fused-batching", layout="fused"),
    Variant("fused-1", layout="fused", batching=False, engine_instances=1),
    # each instance on every core: one frame alone gets both, two frames share them (4 threads on 2 cores;
    # spinning off, else each pool spins on the cores the other computes on: in-process, two sessions at
    # once ran 18.6 frames/s spinning, 24.7 sleeping, 31.7 with one thread each; AMD EPYC Zen 4)
    Variant("fused-2threads", layout="fused", batching=False, ort_threads=2, spinning=False),
    # one frame at a time on every core, spinning (ONNX Runtime's default): the latency layout of one camera
    Variant("fused-1-2threads", layout="fused", batching=False, engine_instances=1, ort_threads=2, spinning=True),
    # the default's `auto` threads (every core for a frame alone, a share each for frames computed together)
    # with the pool sleeping between ops instead of spinning
    Variant("fused-auto-sleep", layout="fused", batching=False, ort_threads=contract.ORT_THREADS_AUTO, spinning=False),
    Variant("fused-1thread", layout="fused", batching=False, ort_threads=1),  # the export default until 2026-12-06 22:00
    # the default's layout and threads on OpenVINO's CPU plugin: float32 (same numbers), and bf16 (what
    # `promptmad export --precision bf16` serves; its numbers move: judge them with int8-gate)
    Variant("fused-openvino", layout="fused", batching=False, engine="openvino", inference_precision="f32"),
    Variant("fused-openvino-bf16", layout="fused", batching=False, engine="openvino", inference_precision="bf16"),
    Variant("steps", batching=False),
    Variant("steps-batching"),  # the export default until 2026-12-06
    Variant("engines-1", engine_instances=1),  # step layout, batching: the instance counts of steps-batching changed
    Variant("engines-2", engine_instances=2),
)}
DEFAULT_VARIANTS = ("default", "fused-1thread", "fused-batching", "steps", "steps-batching", "engines-2")


def preset(name: str) -> Variant:
    if name not in PRESETS:
        raise BenchError(f"variant {name!r}: choose among {', '.join(PRESETS)}")
    return PRESETS[name]


# -- building the repositories --------------------------------------------------------------------

def _engine_models(stage: Path) -> tuple[str, ...]:
    from promptmad.export.fused import layout

    return (contract.FUSED_ENGINE.name,) if layout(stage) == "fused" else contract.ENGINE_STEPS


def _set_batching(cfg, on: bool) -> None:
    """The template's dynamic batcher (the fused step takes the segmentor's), or none."""
    from promptmad.export.repository import load_template

    cfg.ClearField("dynamic_batching")
    if on:
        template = contract.SEGMENTOR.name if cfg.name == contract.FUSED_ENGINE.name else cfg.name
        cfg.dynamic_batching.CopyFrom(load_template(template).dynamic_batching)


def _change(variant: Variant, stage: Path, manifest: dict) -> dict:
    """Applies `variant` to an edit copy of a step-layout repository; returns its manifest."""
    from promptmad.export.fused import fuse_stage
    from promptmad.export.repository_edit import read_config, write_config

    if variant.layout == "fused":
        manifest = fuse_stage(stage, manifest, **({} if variant.engine_instances is KEEP else {"instances": variant.engine_instances}))
    engines = _engine_models(stage)
    for cfg_path in sorted(stage.glob("*/config.pbtxt")):
        cfg = read_config(cfg_path)
        if cfg.platform == "ensemble":
            continue
        _set_batching(cfg, variant.batching)
        if variant.engine_instances is not KEEP and cfg.name in engines:
            for group in cfg.instance_group:
                group.count = variant.engine_instances
        if variant.ort_threads is not KEEP and cfg.name in engines:
            cfg.parameters[contract.PARAM_ORT_THREADS].string_value = str(variant.ort_threads)
        if variant.spinning is not KEEP and cfg.name in engines:
            cfg.parameters[contract.PARAM_ORT_SPINNING].string_value = "1" if variant.spinning else "0"
        if variant.engine is not KEEP and cfg.name in engines:
            cfg.parameters[contract.PARAM_ENGINE].string_value = variant.engine
            cfg.parameters[contract.PARAM_INFERENCE_PRECISION].string_value = variant.inference_precision or "f32"
        write_config(cfg_path, cfg)
    return {**manifest, "variant": asdict(variant), "dynamic_batching": variant.batching}


def build_variant(repo: str | Path, variant: Variant, out_dir: str | Path) -> Path:
    """A copy of the exported python-ort repository `repo` at `out_dir` (replaced if there), changed
    as `variant` says and sealed."""
    from promptmad.export.repository_edit import edit_repository, read_config

    repo, out_dir = Path(repo), Path(out_dir)
    runtime = read_config(repo / contract.MODEL_NAME / "config.pbtxt").parameters[contract.PARAM_RUNTIME].string_value
    if runtime != "python-ort":
        raise BenchError(f"{repo}: runtime {runtime!r}; the variants are of the CPU runtime, export with --runtime python-ort")
    from promptmad.export.fused import layout

    if layout(repo) != contract.LAYOUTS[0]:
        raise BenchError(f"--repo {repo} is in the {layout(repo)} layout; the variants are built from the three step graphs: "
                         f"export a step-layout copy with `promptmad export --ckpt RUN --out DIR --layout steps` and pass --repo DIR")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(repo, out_dir)
    edit_repository(out_dir, lambda stage, manifest: _change(variant, stage, manifest))
    return out_dir


def engine_threads(repo: Path) -> str:
    """Threads per engine instance of a built repository: ONNX Runtime's, and ' spin' when its pool spins; or
    OpenVINO's, named with its inference precision."""
    from promptmad.export.repository_edit import read_config

    params = read_config(Path(repo) / _engine_models(Path(repo))[-1] / "config.pbtxt").parameters
    threads = params[contract.PARAM_ORT_THREADS].string_value if contract.PARAM_ORT_THREADS in params else "?"
    if contract.PARAM_ENGINE in params and params[contract.PARAM_ENGINE].string_value != contract.ENGINES[0]:
        return f"{threads} ({params[contract.PARAM_ENGINE].string_value} {params[contract.PARAM_INFERENCE_PRECISION].string_value})"
    spin = params[contract.PARAM_ORT_SPINNING].string_value if contract.PARAM_ORT_SPINNING in params else "1"
    return threads + (" spin" if spin == "1" and threads != "1" else "")


def engine_instances(repo: Path) -> dict[str, int]:
    """Instances of each engine step of a built repository, as its configs say."""
    from promptmad.export.repository_edit import read_config

    return {m: sum(g.count for g in read_config(Path(repo) / m / "config.pbtxt").instance_group) for m in _engine_models(Path(repo))}


# -- measuring -----------------------------------------------------------------------------------

def _round_figures(sw) -> dict:
    """What one sweep of one variant gives: c=1 and best-concurrency FPS with p50/p95 (ms)."""
    from promptmad.benchmarks.report import point

    def fig(row):
        p = point(row)
        return {"concurrency": p.get("Concurrency"), "fps": p.get("Inferences/Second"),
                "p50_ms": p.get("p50 latency", 0) / 1000, "p95_ms": p.get("p95 latency", 0) / 1000, "stable": p.get("stable", True)}

    return {"c1": fig(sw.first()), "best": fig(sw.best())}


def summarise(rounds: list[dict[str, dict]], names: Sequence[str]) -> dict[str, dict]:
    """Per variant: medians over rounds, and the median of the per-round FPS ratios to the first variant
    (each ratio taken inside one round, where both were measured a minute apart)."""
    out = {}
    ref = names[0]
    for name in names:
        per = [r[name] for r in rounds if name in r]
        med = {k: {f: statistics.median(p[k][f] for p in per) for f in ("fps", "p50_ms", "p95_ms")} for k in ("c1", "best")}
        best_c = [p["best"]["concurrency"] for p in per]
        ratios = {k: statistics.median(r[name][k]["fps"] / r[ref][k]["fps"] for r in rounds if name in r and ref in r and r[ref][k]["fps"])
                  for k in ("c1", "best")}
        out[name] = {**med, "best_concurrency": best_c, "ratio_to_" + ref: ratios, "rounds": len(per),
                     "stable": all(p[k]["stable"] for p in per for k in ("c1", "best"))}
    return out


def instruction_sets() -> str:
    """The vector instruction sets of this CPU that decide ONNX Runtime's kernels (from /proc/cpuinfo)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(next(line for line in fh if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration) as exc:
        return f"unavailable ({exc!r})"
    return " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)


def format_markdown(summary: dict) -> str:
    m = summary["machine"]
    ref = summary["variants"][0]["name"]
    lines = [f"# Serving variants, side by side ({summary['date']})", "",
             f"Machine: {m.get('cpu')} ({summary.get('instruction_sets')}), {m.get('cores')} cores, {m.get('memory')}, GPU {m.get('gpu')}; "
             f"onnxruntime {m.get('onnxruntime')}, perf_analyzer {m.get('perf_analyzer')}.",
             f"Repository {summary['repository']} (same weights in every variant); {summary['n_frames']} real frames of "
             f"{summary['data']} at {summary['image_size']}x{summary['image_size']}; perf_analyzer over gRPC, concurrency "
             f"{':'.join(map(str, summary['concurrency']))}, {summary['rounds']} rounds alternated "
             f"({' '.join(v['name'] for v in summary['variants'])}, repeated). Medians over rounds; ratios: median of "
             f"the per-round ratios to `{ref}`.", "",
             f"| variant | layout | batching | engine instances ({'/'.join(contract.ENGINE_STEPS)}, or fused) | threads per instance (engine) | c=1 FPS | c=1 p50 / p95 ms | best FPS (c) | best p50 / p95 ms | c=1 vs {ref} | best vs {ref} |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for v in summary["variants"]:
        s = summary["results"][v["name"]]
        r = s["ratio_to_" + ref]
        inst = "/".join(str(n) for n in summary["engine_instances"][v["name"]].values())
        flag = "" if s["stable"] else " (unstable)"
        threads = summary.get("engine_threads", {}).get(v["name"], "?")
        lines.append(f"| {v['name']}{flag} | {v['layout']} | {'on' if v['batching'] else 'off'} | {inst} | {threads} | {s['c1']['fps']:.1f} | "
                     f"{s['c1']['p50_ms']:.0f} / {s['c1']['p95_ms']:.0f} | {s['best']['fps']:.1f} ({'/'.join(map(str, s['best_concurrency']))}) | "
                     f"{s['best']['p50_ms']:.0f} / {s['best']['p95_ms']:.0f} | {r['c1']:.2f}x | {r['best']:.2f}x |")
    fastest = max(summary["variants"], key=lambda v: summary["results"][v["name"]]["best"]["fps"])["name"]
    alone = max(summary["variants"], key=lambda v: summary["results"][v["name"]]["c1"]["fps"])["name"]
    lines += ["", f"Fastest at the best concurrency: **{fastest}**; at concurrency 1: **{alone}**. Every variant serves the same ensembles "
              f"({contract.MODEL_NAME}, {contract.ENCODED_MODEL_NAME}) with the same inputs, outputs and class bank."]
    reduced = [v["name"] for v in summary["variants"] if v.get("inference_precision") not in (None, contract.INFERENCE_PRECISIONS[0])]
    if reduced:  # faster is not the same answers: what judges them is the quality gate, not this table
        lines.append(f"{', '.join(reduced)} compute{'s' if len(reduced) == 1 else ''} in bf16, which moves the numbers: serve it "
                     "from `promptmad export --precision bf16` after `promptmad int8-gate` passes on that repository.")
    return "\n".join(lines) + "\n"


def run_variants(repo: str | Path, data: str | Path, out: str | Path, variants: Sequence[Variant], *,
                 rounds: int = 2, concurrency: tuple[int, int, int] = (1, 8, 1), n_frames: int = 32,
                 image_size: int | None = 256, request_count: int = 40) -> dict:
    """Builds every variant under `out/repos/`, serves them all, sweeps them in alternation `rounds`
    times, writes `out/results.json` and `out/results.md` and returns the summary."""
    import datetime

    from promptmad.benchmarks.frames import class_ids, load_frames
    from promptmad.benchmarks.machine import machine_description
    from promptmad.benchmarks.perf_analyzer import check_perf_analyzer
    from promptmad.benchmarks.server_stats import ensemble_parameters
    from promptmad.benchmarks.sweep import sweep_ensemble
    from promptmad.export.server import TritonServer

    names = [v.name for v in variants]
    if len(set(names)) != len(names) or len(names) < 2:
        raise BenchError(f"variants {names}: give at least two, each once")
    if rounds < 1:
        raise BenchError(f"rounds {rounds}: give at least 1 (2 or more to see the spread)")
    check_perf_analyzer()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    repos = {v.name: build_variant(repo, v, out / "repos" / v.name) for v in variants}
    instances = {name: engine_instances(path) for name, path in repos.items()}
    threads = {name: engine_threads(path) for name, path in repos.items()}
    servers = {}
    try:
        for name, path in repos.items():
            log.info("starting the %s variant's server", name)
            servers[name] = TritonServer(path).start()
        params = ensemble_parameters(servers[names[0]].grpc_url)
        size = image_size or params["image_size"]
        frames, frame_classes = load_frames(data, n=n_frames, size=size)
        ids = class_ids(frame_classes, params["class_names"])
        per_round: list[dict[str, dict]] = []
        for r in range(rounds):
            per_round.append({})
            for name in names:
                sw = sweep_ensemble(servers[name].grpc_url, frames, ids, out / "perf", f"{name}_round{r + 1}",
                                    concurrency=concurrency, request_count=request_count)
                per_round[-1][name] = _round_figures(sw)
                log.info("round %d %s: %s", r + 1, name, per_round[-1][name])
    finally:
        for server in servers.values():
            server.stop()
    summary = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine_description(), "instruction_sets": instruction_sets(), "repository": str(repo), "data": str(data), "image_size": size,
               "n_frames": n_frames, "concurrency": list(concurrency), "rounds": rounds, "request_count": request_count,
               "variants": [asdict(v) for v in variants], "engine_instances": instances, "engine_threads": threads, "per_round": per_round, "results": summarise(per_round, names)}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "results.md").write_text(format_markdown(summary))
    return summary
