"""CLI of the export stage: `promptmad export` and `promptmad serve`."""

from __future__ import annotations

import argparse

from promptmad import contract
from promptmad.export.calibration import CALIBRATION_METHODS, QuantizeConfig

QUANTIZE_DEFAULTS = QuantizeConfig()

NGC_COMMAND = (
    "docker run --gpus all --rm -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD/model_repository:/models "
    "nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository=/models"
)


EXPORT_DESCRIPTION = (
    "Export a run: precompute the per-class prompt tables, export the visual encoder, the "
    "reconstructor and the segmentor (10 diffusion steps unrolled) to ONNX, check every op "
    "against ONNX-TensorRT's list and every graph against PyTorch on real frames, build "
    "TensorRT engines (--runtime tensorrt, GPU + TensorRT only), and write the Triton ensemble "
    f"'{contract.MODEL_NAME}' (raw frames) and '{contract.ENCODED_MODEL_NAME}' (PNG/JPEG bytes) into --out. "
    "The repository is replaced atomically."
)
SERVE_DESCRIPTION = (
    "Start the tritonserver 2.51 that ships in the nvidia-pytriton wheel (Python backend, "
    "ensembles) on REPO. Listens on 127.0.0.1 only unless --host is given; models cannot be "
    "loaded or unloaded remotely (model control mode none), except in --model-control-mode explicit, which "
    "`promptmad classes` needs to add or remove a class while the server runs. The repository's manifest "
    "checksums are verified first. Shared memory, logging, trace and model-repository APIs need the "
    f"admin key in header '{contract.ADMIN_KEY_HEADER}' (${contract.ADMIN_KEY_ENV}, else a random key written to "
    "--admin-key-file). A step whose process dies makes the server restart on the same ports. "
    "Ctrl-C stops the server."
)


def _ort_threads(text: str):
    from promptmad.errors import ExportError
    from promptmad.export.repository import parse_ort_threads

    try:
        return parse_ort_threads(text)
    except ExportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers) -> None:
    _register_export(subparsers)
    _register_serve(subparsers)
    _register_int8_gate(subparsers)


def _add_parser(subparsers, name: str, help: str, description: str, epilog: str):
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def _register_export(subparsers) -> None:
    e = _add_parser(subparsers, "export", "turn a training run into a Triton model repository (ONNX / TensorRT + ensemble)",
                    EXPORT_DESCRIPTION, f"Serve a tensorrt/onnxruntime repository in the NGC container:\n  {NGC_COMMAND}")
    e.add_argument("--ckpt", required=True, help="run directory written by `promptmad train`")
    e.add_argument("--out", default="model_repository", help="repository folder to write (default: model_repository)")
    e.add_argument("--runtime", default=contract.DEFAULT_RUNTIME, choices=contract.RUNTIMES,
                   help="python-ort: embedded server (CPU); onnxruntime / tensorrt: NGC Triton container (default: %(default)s)")
    e.add_argument("--max-batch", type=int, default=contract.DEFAULT_MAX_BATCH,
                   help="max_batch_size of every model = TensorRT profile max (default: %(default)s)")
    e.add_argument("--data", help="dataset whose test frames are used for the parity checks (default: the run's prompt images)")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    e.add_argument("--instances", type=int, help="instances of each engine model (default: 2 for the segmentor with python-ort, else 1)")
    e.add_argument("--ort-threads", type=_ort_threads,
                   help="python-ort: ONNX Runtime threads per engine instance: a number (0 = every core) or "
                        f"'{contract.ORT_THREADS_AUTO}' (an instance computing alone takes every core of the server, instances "
                        f"computing together split them). Default: {contract.ORT_THREADS_AUTO} for the fused layout; 1 for the "
                        "steps layout, whose steps compute side by side as a pipeline")
    e.add_argument("--no-fp16", action="store_true", help="tensorrt: build FP32 engines")
    e.add_argument("--skip-parity", action="store_true", help="skip the PyTorch-vs-ONNX parity check (not recommended)")
    e.add_argument("--layout", choices=contract.LAYOUTS,
                   help="'fused' serves the encoder, reconstructor and segmentor as one merged ONNX graph (4 hops instead "
                        "of 6; python-ort only; measured the fastest on a 2-core CPU, benchmarks/README.md); 'steps' serves "
                        "them as three models (per-step statistics and instances); clients cannot tell "
                        "(default: fused for python-ort, steps for the GPU runtimes)")
    e.add_argument("--dynamic-batching", choices=("on", "off"),
                   help="Triton's dynamic batcher on every step (default: off for python-ort, where batched frames run no "
                        "faster than one after the other; on for the GPU runtimes)")
    q = e.add_argument_group("INT8 and BF16 (--precision int8 | bf16)")
    q.add_argument("--precision", default="fp32", choices=("fp32", "int8", "bf16"),
                   help="fp32 (default); int8: ONNX Runtime static quantization (QDQ, per-channel int8 weights; uint8 "
                        "activations on CPU, symmetric int8 for tensorrt) "
                        "calibrated on training frames of the run's classes (--data, else the run's training data), half of them with "
                        "a synthesised defect; "
                        "a per-block sensitivity sweep keeps in float what moves the map; with --runtime tensorrt, INT8 engines; "
                        "bf16 (python-ort only): the float32 graphs served by OpenVINO's CPU plugin in bf16, faster on a CPU "
                        "with AVX512_BF16 or AMX (elsewhere OpenVINO computes in float32). Judge int8 and bf16 with "
                        "`promptmad int8-gate`")
    q.add_argument("--calibration-method", default=QUANTIZE_DEFAULTS.method, choices=CALIBRATION_METHODS,
                   help="ONNX Runtime calibration method (default: %(default)s)")
    q.add_argument("--calibration-frames", type=int, default=QUANTIZE_DEFAULTS.frames,
                   help="training frames to calibrate on (default: %(default)s)")
    q.add_argument("--sweep-frames", type=int, default=QUANTIZE_DEFAULTS.held_frames,
                   help="further training frames the sensitivity sweep measures on (default: %(default)s)")
    q.add_argument("--calibration-defect-share", type=float, default=QUANTIZE_DEFAULTS.defect_share,
                   help="share of the calibration and sweep frames painted with a synthesised defect (the training "
                        "augmentation): normal frames alone leave the ranges blind to a defect's activations "
                        "(default: %(default)s; 0: normal frames only)")
    q.add_argument("--map-tolerance", type=float, default=QUANTIZE_DEFAULTS.map_tolerance,
                   help="RMS change of the served map (normal standard deviations) the INT8 chain may make on the sweep "
                        "frames; blocks go back to float until it holds (default: %(default)s)")
    e.set_defaults(func=_export)


GATE_DESCRIPTION = (
    "The INT8 (and BF16) quality gate: serve the FP32 and the INT8 (or BF16) repository of one run in turn (a real tritonserver each), "
    "score the test split of --data with each, and compare `promptmad evaluate`'s mean metrics: P-AUROC and I-AUROC "
    "may drop by 0.5 points, P-AP and AUPRO by 1 point. With --speed, also the served FPS of both in one run "
    "(perf_analyzer on the ensemble, rounds alternating). Each defect kind's metrics are printed beside the means "
    "(informative: a precision may cost one kind what the means hide). The figures are written into the INT8 repository's "
    "manifest.json. Exit status 1 when the gate fails."
)


def _register_int8_gate(subparsers) -> None:
    g = _add_parser(subparsers, "int8-gate", "quality gate (and served speed) of an INT8 or BF16 repository against its FP32 twin",
                    GATE_DESCRIPTION, "example:\n  promptmad export --ckpt RUN --out repo_fp32\n"
                    "  promptmad export --ckpt RUN --out repo_int8 --precision int8\n"
                    "  promptmad int8-gate --fp32 repo_fp32 --int8 repo_int8 --data data/synth --speed")
    g.add_argument("--fp32", required=True, help="repository exported with --precision fp32")
    g.add_argument("--int8", required=True, help="repository exported from the same run with --precision int8 (or bf16)")
    g.add_argument("--data", required=True, help="dataset with a test split of the run's classes")
    g.add_argument("--classes", nargs="+", help="evaluate these classes only (default: all served)")
    g.add_argument("--no-quality", action="store_true", help="skip the quality gate (with --speed: speed only)")
    g.add_argument("--speed", action="store_true", help="also measure served FPS of both repositories in one run")
    g.add_argument("--concurrency", default="1:4", help="with --speed: perf_analyzer concurrency START:END[:STEP] (default: 1:4)")
    g.add_argument("--image-size", type=int, default=256, help="with --speed: frame size sent (default: 256)")
    g.add_argument("--rounds", type=int, default=2, help="with --speed: alternating rounds per repository (default: 2)")
    g.add_argument("--out", default="int8_gate", help="with --speed: folder for perf_analyzer files (default: int8_gate)")
    g.add_argument("--no-manifest", action="store_true", help="do not write the figures into the INT8 manifest")
    g.set_defaults(func=_int8_gate)


def _int8_gate(args) -> int:
    from promptmad.benchmarks.cli import _range
    from promptmad.export.quality_gate import format_gate, format_speed, quality_gate, speed_comparison

    ok = True
    if not args.no_quality:
        doc = quality_gate(args.fp32, args.int8, args.data, classes=args.classes, write_manifest=not args.no_manifest)
        print(format_gate(doc))
        ok = doc["pass"]
    if args.speed:
        print(format_speed(speed_comparison(args.fp32, args.int8, args.data, args.out, concurrency=_range(args.concurrency),
                                            size=args.image_size, rounds=args.rounds, write_manifest=not args.no_manifest)))
    if not args.no_manifest:
        print(f"figures written into {args.int8}/manifest.json")
    return 0 if ok else 1


def _register_serve(subparsers) -> None:
    s = _add_parser(subparsers, "serve", "start a real Triton server on an exported repository",
                    SERVE_DESCRIPTION, f"tensorrt / onnxruntime repositories run in the NGC container instead:\n  {NGC_COMMAND}")
    s.add_argument("--repo", default="model_repository", help="model repository (default: model_repository)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 exposes it to the network)")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--model-control-mode", default="none", choices=["none", "poll", "explicit"],
                   help="none (default): a verified private snapshot, read once. explicit: serves REPO itself and loads "
                        "what `promptmad classes --server` asks for (admin key). poll: not recommended (SECURITY.md)")
    s.add_argument("--no-verify", action="store_true", help="do not verify the manifest checksums")
    s.add_argument("--log-verbose", type=int, default=0)
    s.add_argument("--replicas", type=int, default=1,
                   help="local servers to start, each on the next block of ports (8000-8002, 8003-8005, ...), to try a "
                        "fleet on one machine: point the client at all of their gRPC (or HTTP) ports (default: 1)")
    s.add_argument("--admin-key-file", help="where to write the admin key, mode 0600 "
                   "(default: ~/.cache/promptmad/admin-key-<http port>, or under $PROMPTMAD_CACHE)")
    s.set_defaults(func=_serve)


def _export(args) -> int:
    from promptmad.export.pipeline import export_run

    quantize = QuantizeConfig(method=args.calibration_method, frames=args.calibration_frames, held_frames=args.sweep_frames,
                              defect_share=args.calibration_defect_share, map_tolerance=args.map_tolerance)
    result = export_run(
        args.ckpt, args.out, runtime=args.runtime, max_batch=args.max_batch, data=args.data, opset=args.opset,
        check_parity=not args.skip_parity, fp16=not args.no_fp16, instance_count=args.instances, ort_threads=args.ort_threads,
        precision=args.precision, quantize=quantize, layout=args.layout,
        dynamic_batching=None if args.dynamic_batching is None else args.dynamic_batching == "on",
    )
    print(f"wrote {result.repository} (runtime {args.runtime}, {args.precision}, layout {result.manifest['layout']}, "
          f"dynamic batching {'on' if result.manifest['dynamic_batching'] else 'off'}, classes {', '.join(result.manifest['classes'])})")
    if result.parity:
        print("parity vs PyTorch (max abs error): " + ", ".join(f"{k} {v:.1e}" for k, v in result.parity.items()))
    q = result.manifest.get("quantization")
    if q:
        kept = {s: sorted(b) for s, b in q["excluded"].items() if b}
        print(f"INT8: {q['calibration_frames']} calibration frames ({q['config']['method']}), kept float: {kept or 'nothing'}, "
              f"map RMS vs fp32 on {q['held_frames']} sweep frames {q['chain_map_rms']:.3g} (sweep {q['sweep_seconds']:.0f} s)")
        print(f"quality gate: promptmad int8-gate --fp32 FP32_REPO --int8 {args.out} --data DATA")
    b = result.manifest.get("bf16")
    if b:
        print(f"BF16: OpenVINO {b['openvino_version'].split('-')[0]}, this machine computed in {b['export_machine_computed_in']}")
        print(f"quality gate: promptmad int8-gate --fp32 FP32_REPO --int8 {args.out} --data DATA")
    if args.runtime == "python-ort":
        print(f"next: promptmad serve --repo {args.out}")
    else:
        print(f"next (NGC container): {NGC_COMMAND}")
    return 0


def _serve(args) -> int:
    from promptmad.export.fleet import make_replicas, start_all, stop_all
    from promptmad.export.repository import validate_repository

    validate_repository(args.repo)
    servers = make_replicas(args.repo, args.replicas, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                            metrics_port=args.metrics_port, model_control_mode=args.model_control_mode,
                            log_verbose=args.log_verbose, verify_manifest=not args.no_verify, startup_timeout=300)
    server = servers[0]  # replicas share its admin key
    key_file = write_admin_key(server.admin_key, args.admin_key_file or default_admin_key_file(server.http_port))
    print(f"starting {len(servers)} tritonserver(s) on {args.repo} (log: {', '.join(str(s.log_path) for s in servers)}) ...",
          flush=True)
    try:
        start_all(servers)
        # before "ready." is printed: a Ctrl-C right after it must still stop the server cleanly
        stop = _stop_on_signals()
        try:
            _print_models(server)
            for s in servers:
                print(f"ready.  gRPC {s.grpc_url}   HTTP {s.http_url}   metrics {s.metrics_url}   admin key: {key_file}")
            if len(servers) > 1:
                print(f"client: AnomalyClient([{', '.join(repr(s.grpc_url) for s in servers)}])")
            print("Ctrl-C to stop.", flush=True)
            return _wait(servers, stop)
        finally:
            print("stopping tritonserver ...", flush=True)
            stop_all(servers)
            print("stopped.")
    finally:
        key_file.unlink(missing_ok=True)  # the key means nothing once the server is gone


def default_admin_key_file(http_port: int):
    """One file per HTTP port, so two servers on one host do not overwrite each other's key."""
    import os
    from pathlib import Path

    cache = Path(os.environ.get("PROMPTMAD_CACHE", Path.home() / ".cache" / "promptmad"))
    return cache / f"admin-key-{http_port}"


def write_admin_key(key: str, path):
    """Writes the key to `path` readable by this user only (0600, folder created 0700); returns the path."""
    import os
    from pathlib import Path

    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        os.write(fd, key.encode())
    finally:
        os.close(fd)
    return path


def _stop_on_signals() -> dict[str, bool]:
    """SIGINT/SIGTERM set the returned flag instead of raising inside the wait loop."""
    import signal

    stop = {"now": False}

    def _handler(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    return stop


def _print_models(server) -> None:
    """Each model's state from the repository index (best effort: the server is already ready)."""
    import json
    import urllib.request

    try:
        req = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}", method="POST",
                                     headers={contract.ADMIN_KEY_HEADER: server.admin_key})  # a restricted API
        with urllib.request.urlopen(req, timeout=5) as r:
            for m in json.loads(r.read()):
                print(f"  {m['name']:<20} {m.get('state', '?')}")
    except OSError:
        pass


def _wait(servers, stop: dict[str, bool]) -> int:
    """Until a signal (0) or a restart that fails (1, with the server's last log lines). A dead step
    (or a server that exited on its own) makes its supervisor restart it; each restart prints a line."""
    import time

    from promptmad.errors import ServeError
    from promptmad.export.supervisor import Supervisor

    supervisors = [Supervisor(s).arm() for s in servers]
    while not stop["now"]:
        for supervisor in supervisors:
            try:
                event = supervisor.check()
            except ServeError as exc:
                print(f"tritonserver could not be restarted: {exc}", flush=True)
                return 1
            if event:
                print(event, flush=True)
        time.sleep(0.5)
    return 0
