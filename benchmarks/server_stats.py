"""What a running Triton server says about itself: the served ensemble's parameters, every model's
cumulative statistics (statistics extension, over gRPC) and the per-step cost between two snapshots."""

from __future__ import annotations

import json
from typing import Sequence

from promptmad import contract
from promptmad.benchmarks.perf_analyzer import BenchError
from promptmad.benchmarks.sweep import STEPS


def ensemble_parameters(grpc_url: str, model: str = contract.MODEL_NAME) -> dict:
    """``class_names`` and ``image_size`` from the served ensemble's config parameters."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        params = client.get_model_config(model, as_json=True)["config"].get("parameters", {})
    finally:
        client.close()
    try:
        return {"class_names": json.loads(params[contract.PARAM_CLASS_NAMES]["string_value"]),
                "image_size": int(params[contract.PARAM_IMAGE_SIZE]["string_value"])}
    except KeyError as exc:
        raise BenchError(f"ensemble {model!r} has no {exc} parameter (export it with `promptmad export`)") from exc


def _ns(d: dict, key: str) -> int:
    return int(d.get(key, {}).get("ns", 0))


def server_stats(grpc_url: str) -> dict[str, dict[str, float]]:
    """Cumulative counts and times of every model, by model name."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    out = {}
    for m in stats.get("model_stats", []):
        st = m.get("inference_stats", {})
        out[m["name"]] = {
            "inference_count": int(m.get("inference_count", 0)), "execution_count": int(m.get("execution_count", 0)),
            "success_count": int(st.get("success", {}).get("count", 0)),
            "queue_ns": _ns(st, "queue"), "compute_input_ns": _ns(st, "compute_input"),
            "compute_infer_ns": _ns(st, "compute_infer"), "compute_output_ns": _ns(st, "compute_output"),
            # per execution (a batch counts once): the machine time a step really costs
            "batch_compute_ns": sum(_ns(b, "compute_input") + _ns(b, "compute_infer") + _ns(b, "compute_output")
                                    for b in m.get("batch_stats", [])),
        }
    return out


# every composing model of either layout (the fused one runs fused_engine in place of the three engine steps);
# a model the served repository does not have is skipped
BREAKDOWN_STEPS = (*STEPS, contract.FUSED_ENGINE.name)


def step_breakdown(before: dict, after: dict, steps: Sequence[str] = BREAKDOWN_STEPS) -> dict[str, dict[str, float]]:
    """Per composing model, between two :func:`server_stats` snapshots:

    - ``compute_ms_per_frame``: compute time of its executions divided by the frames they carried
      (a batch of 2 taking 30 ms costs 15 ms per frame): what the step costs the machine;
    - ``compute_ms_per_request`` / ``queue_ms_per_request``: average compute and queue time a
      request spent there (a request in that batch of 2 waited all 30 ms): what it adds to latency;
    - ``avg_batch``: frames per execution (dynamic batching at work).
    """
    out = {}
    for name in steps:
        if name not in after:
            continue
        d = {k: after[name][k] - before.get(name, {}).get(k, 0) for k in after[name]}
        frames = max(1, d["inference_count"])
        requests = max(1, d.get("success_count", 0) or d["inference_count"])
        per_req_compute = (d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"]) / requests / 1e6
        out[name] = {
            "frames": d["inference_count"], "executions": d["execution_count"],
            "compute_ms_per_frame": (d.get("batch_compute_ns", 0) or d["compute_infer_ns"]) / frames / 1e6,
            "compute_ms_per_request": per_req_compute,
            "queue_ms_per_request": d["queue_ns"] / requests / 1e6,
            "avg_batch": d["inference_count"] / max(1, d["execution_count"]),
        }
    return out
