"""`promptmad bench-variants` (benchmarks/variants.py): each variant repository is a sealed, valid copy
changed only as its variant says; the summary takes its ratios inside each round; a real run on the
tiny model serves two variants, sweeps them in alternation with perf_analyzer and writes its results."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from promptmad import contract
from promptmad.benchmarks.perf_analyzer import BenchError
from promptmad.benchmarks.variants import PRESETS, Variant, build_variant, run_variants, summarise
from promptmad.export.fused import FUSED_INSTANCES, FUSED_THREADS
from promptmad.export.manifest import verify_repository_checksums
from promptmad.export.repository import validate_repository
from promptmad.export.repository_edit import read_config


def _configs(repo):
    return {p.parent.name: read_config(p) for p in repo.glob("*/config.pbtxt")}


def test_variant_fields_are_checked():
    with pytest.raises(BenchError, match="layout 'merged', choose one of steps, fused"):
        Variant("x", layout="merged")
    with pytest.raises(BenchError, match="engine_instances 0"):
        Variant("x", engine_instances=0)
    with pytest.raises(BenchError, match="ort_threads 0"):
        Variant("x", ort_threads=0)
    with pytest.raises(BenchError, match="plain folder name"):
        Variant("../x")
    with pytest.raises(BenchError, match="engine 'tvm'"):
        Variant("x", engine="tvm")
    with pytest.raises(BenchError, match="inference_precision 'bf16' needs engine openvino"):
        Variant("x", inference_precision="bf16")


@pytest.mark.parametrize("name", ["default", "fused-batching", "steps", "engines-2", "fused-2threads", "fused-1-2threads",
                                  "fused-1thread", "fused-auto-sleep", "fused-openvino-bf16"])
def test_variant_repository_changes_only_what_it_says(tiny_repository, tmp_path, name):
    variant = PRESETS[name]
    before = verify_repository_checksums(tiny_repository)
    repo = build_variant(tiny_repository, variant, tmp_path / name)
    validate_repository(repo)
    doc = verify_repository_checksums(repo)
    assert verify_repository_checksums(tiny_repository) == before  # the source is not touched
    assert doc["variant"]["name"] == name
    src, got = _configs(tiny_repository), _configs(repo)
    engines = {contract.FUSED_ENGINE.name} if variant.layout == "fused" else set(contract.ENGINE_STEPS)
    assert set(got) == set(contract.FUSED_MODELS if variant.layout == "fused" else contract.ALL_MODELS)
    for model, cfg in got.items():
        if cfg.platform == "ensemble":
            continue
        reference = src.get(model, src[contract.SEGMENTOR.name])  # the fused step is built from the segmentor's
        assert cfg.HasField("dynamic_batching") == variant.batching, model
        count = cfg.instance_group[0].count
        if model in engines and variant.engine_instances is not None:
            assert count == variant.engine_instances, model
        elif model == contract.FUSED_ENGINE.name:
            assert count == FUSED_INSTANCES
        else:
            assert count == reference.instance_group[0].count, model
        assert cfg.max_batch_size == reference.max_batch_size, model
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        if model in engines and variant.ort_threads is not None:
            assert params[contract.PARAM_ORT_THREADS] == str(variant.ort_threads), model
            if variant.spinning is not None:
                assert params[contract.PARAM_ORT_SPINNING] == ("1" if variant.spinning else "0"), model
        elif model == contract.FUSED_ENGINE.name:  # the fused step's own default, whatever the steps had
            assert params[contract.PARAM_ORT_THREADS] == FUSED_THREADS == contract.ORT_THREADS_AUTO
        elif contract.PARAM_ORT_THREADS in reference.parameters:
            assert params[contract.PARAM_ORT_THREADS] == reference.parameters[contract.PARAM_ORT_THREADS].string_value, model
            assert contract.PARAM_ORT_SPINNING not in params, model
        if model in engines and variant.engine is not None:
            assert params[contract.PARAM_ENGINE] == variant.engine, model
            assert params[contract.PARAM_INFERENCE_PRECISION] == variant.inference_precision, model
        else:  # ONNX Runtime, as exported
            assert contract.PARAM_ENGINE not in params, model


def test_variants_are_built_from_the_step_layout_only(tiny_repository, tmp_path):
    """A fused repository has no step graphs to build the step variants from: refused, naming the fix."""
    fused = build_variant(tiny_repository, PRESETS["default"], tmp_path / "fused")
    with pytest.raises(BenchError, match="--layout steps"):
        build_variant(fused, PRESETS["steps"], tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_summary_ratios_are_taken_inside_each_round():
    def fig(c1, best):
        return {"c1": {"fps": c1, "p50_ms": 10.0, "p95_ms": 12.0, "concurrency": 1, "stable": True},
                "best": {"fps": best, "p50_ms": 20.0, "p95_ms": 30.0, "concurrency": 4, "stable": True}}

    # the machine slows down by half in round 2; B stays 1.2x A inside each round
    rounds = [{"A": fig(10, 20), "B": fig(12, 24)}, {"A": fig(5, 10), "B": fig(6, 12)}, {"A": fig(10, 20), "B": fig(12, 24)}]
    s = summarise(rounds, ["A", "B"])
    assert s["B"]["ratio_to_A"]["c1"] == pytest.approx(1.2) and s["B"]["ratio_to_A"]["best"] == pytest.approx(1.2)
    assert s["A"]["ratio_to_A"]["best"] == pytest.approx(1.0)
    assert s["B"]["best"]["fps"] == 24 and s["B"]["rounds"] == 3 and s["B"]["best_concurrency"] == [4, 4, 4]


def test_cli_registers_bench_variants():
    from promptmad.cli import build_parser

    args = build_parser().parse_args(["bench-variants", "--repo", "r", "--data", "d", "--variants", "default", "steps",
                                      "--concurrency", "1:2"])
    assert (args.repo, args.variants, args.concurrency, args.rounds) == ("r", ["default", "steps"], (1, 2, 1), 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench-variants", "--repo", "r", "--data", "d", "--variants", "nonsense"])


@pytest.mark.server
def test_two_variants_measured_in_alternation_end_to_end(tiny_repository, tiny_dataset, tmp_path):
    out = tmp_path / "variants"
    summary = run_variants(tiny_repository, tiny_dataset, out, [PRESETS["default"], PRESETS["steps"]], rounds=2,
                           concurrency=(1, 2, 1), n_frames=4, image_size=64, request_count=10)
    saved = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["default", "steps"] and len(saved["per_round"]) == 2
    for name in ("default", "steps"):
        r = summary["results"][name]
        assert r["c1"]["fps"] > 0 and r["best"]["fps"] >= r["c1"]["fps"] * 0.5 and r["rounds"] == 2
        assert r["c1"]["p95_ms"] >= r["c1"]["p50_ms"] > 0
    assert summary["results"]["default"]["ratio_to_default"]["c1"] == pytest.approx(1.0)
    # A B A B: each sweep's CSV was written after the previous one's
    order = [out / "perf" / f"perf_{n}_round{r}.csv" for r in (1, 2) for n in ("default", "steps")]
    times = [p.stat().st_mtime_ns for p in order]
    assert times == sorted(times), order
    md = (out / "results.md").read_text()
    assert summary["machine"]["cpu"] in md and "| default |" in md and "| steps |" in md and "x |" in md
    assert (out / "repos" / "default" / contract.FUSED_ENGINE.name).is_dir()
    assert (out / "repos" / "steps" / contract.SEGMENTOR.name).is_dir()


def test_an_openvino_variant_is_named_and_its_bf16_flagged(tiny_repository, tmp_path):
    """The table says which engine ran a variant, and that a bf16 one answers otherwise (the gate judges it)."""
    from promptmad.benchmarks.variants import engine_threads, format_markdown

    repo = build_variant(tiny_repository, PRESETS["fused-openvino-bf16"], tmp_path / "bf16")
    assert engine_threads(repo) == f"{contract.ORT_THREADS_AUTO} (openvino bf16)"
    assert engine_threads(build_variant(tiny_repository, PRESETS["default"], tmp_path / "d")) == "auto spin"
    fig = {"fps": 10.0, "p50_ms": 1.0, "p95_ms": 2.0}
    result = {"c1": fig, "best": fig, "best_concurrency": [1], "stable": True, "ratio_to_default": {"c1": 1.0, "best": 1.0}}
    summary = {"machine": {"cpu": "cpu"}, "date": "d", "instruction_sets": "", "repository": "r", "n_frames": 1, "data": "d",
               "image_size": 64, "concurrency": [1, 1, 1], "rounds": 1,
               "variants": [asdict(PRESETS["default"]), asdict(PRESETS["fused-openvino-bf16"])],
               "engine_instances": {"default": {"f": 2}, "fused-openvino-bf16": {"f": 2}},
               "engine_threads": {"default": "auto spin", "fused-openvino-bf16": "auto (openvino bf16)"},
               "results": {"default": result, "fused-openvino-bf16": result}}
    md = format_markdown(summary)
    assert "| auto (openvino bf16) |" in md
    assert "fused-openvino-bf16 computes in bf16" in md and "int8-gate" in md
    summary["variants"] = summary["variants"][:1]
    assert "bf16" not in format_markdown(summary)
