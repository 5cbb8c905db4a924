"""Triton Python backend running one exported ONNX graph with ONNX Runtime (runtime `python-ort`,
the one the embedded pytriton server can run; the NGC container uses onnxruntime_onnx/tensorrt_plan
models for the same graphs). `promptmad export` copies this file to <step>/1/model.py.

All requests of a dynamic batch are concatenated into one ONNX Runtime run and the outputs split
back per request. Fail closed: float inputs with NaN/inf are refused per request, and so is a
request whose outputs are not finite (inputs far outside the trained range overflow to NaN, and a
NaN score compares False against any threshold: it would pass a part). Every error names the step.

Engine (contract.PARAM_ENGINE): ONNX Runtime (the default), or OpenVINO's CPU plugin on the same graph, which
`promptmad export --precision bf16` asks for with inference precision bf16 (contract.PARAM_INFERENCE_PRECISION): on a
CPU with native bf16 (AVX512_BF16, AMX) the served ensemble ran 1.39x the frames a second of the float32 default
(benchmarks/README.md, "BF16"), a precision ONNX Runtime's CPU kernels do not offer.

Threads `auto` (contract.ORT_THREADS_AUTO): an instance computing alone uses every core of the server, and
instances computing at the same time split them (each instance keeps one session per thread count it may
need). On 2 cores, one camera's frame runs on both (1.5x faster than on one), and two frames in flight run
on one core each, where a session of 2 threads per instance would oversubscribe the cores (measured in
benchmarks/README.md, "`auto` threads").
"""

import fcntl
import json
import os
import struct
import tempfile
import time

import numpy as np
import triton_python_backend_utils as pb_utils


AUTO = "auto"  # contract.ORT_THREADS_AUTO (this file runs in the stub, without promptmad installed)
SHARE_PREFIX = "promptmad-threads-"  # contract.THREAD_SHARE_PREFIX
ENGINE_ORT, ENGINE_OPENVINO = "onnxruntime", "openvino"  # contract.ENGINES


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


class ThreadShare:
    """Which instances of one model in one server are computing now: one byte-range lock per instance in a
    file named by the user, the server's pid and the model. Each instance owns a slot (an exclusive lock on byte
    `MAX_SLOTS + slot`, held for its life, released by the kernel if it dies) and locks byte `slot` while it
    computes; the others probe that byte without waiting. An instance takes its busy lock before probing, so
    of two instances starting together at least one sees the other.

    Under steady load an instance sometimes starts in the few ms its peer spends between two frames; taking
    every core then would crowd the peer's next frame for the whole run. So an instance that saw peers
    computing writes (when, how many) into the file, and for `recent_s` after that the others count that many
    even when they find them idle for a moment. Frames that never overlap (one camera waiting for each verdict)
    never write it."""

    MAX_SLOTS = 32  # instances of one model, old and new ones together while it reloads
    RECENT = struct.Struct("dd")  # (time.monotonic() of the last overlap, peers computing then), at RECENT_AT
    RECENT_AT = 4096

    def __init__(self, model_name, recent_s=0.5):
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        # the user in the name: two users' servers in containers sharing /dev/shm can have the same pid
        self.path = os.path.join(folder, f"{SHARE_PREFIX}{os.getuid()}-{os.getppid()}-{model_name}")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.recent_s = recent_s
        self.slot = next((i for i in range(self.MAX_SLOTS) if self._try(fcntl.LOCK_EX, self.MAX_SLOTS + i)), None)
        if self.slot is None:
            raise RuntimeError(f"{model_name}: more than {self.MAX_SLOTS} instances share {self.path}")

    def _try(self, mode, byte):
        try:
            fcntl.lockf(self.fd, mode | fcntl.LOCK_NB, 1, byte)
            return True
        except OSError:
            return False

    def _held(self, byte):
        """Whether another process holds a lock on `byte` (probing takes and drops a shared lock)."""
        if self._try(fcntl.LOCK_SH, byte):
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, byte)
            return False
        return True

    def begin(self):
        """Mark this instance busy; returns how many other instances compute now, or did in the last `recent_s`."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, self.slot)
        busy = sum(self._held(i) for i in range(self.MAX_SLOTS) if i != self.slot and self._held(self.MAX_SLOTS + i))
        now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
        if busy:
            os.pwrite(self.fd, self.RECENT.pack(now, busy), self.RECENT_AT)
            return busy
        raw = os.pread(self.fd, self.RECENT.size, self.RECENT_AT)
        when, peers = self.RECENT.unpack(raw) if len(raw) == self.RECENT.size else (0.0, 0.0)
        return int(peers) if 0 <= now - when < self.recent_s else 0

    def end(self):
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.slot)

    def close(self):
        """The last instance to go removes the file (a later server has another pid, hence another file)."""
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.MAX_SLOTS + self.slot)
        if not any(self._held(self.MAX_SLOTS + i) for i in range(self.MAX_SLOTS)):
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)


def cgroup_cpu_limit(root="/sys/fs/cgroup"):
    """CPUs the container's CFS quota allows (Kubernetes `resources.limits.cpu`), rounded up; None without one.
    The affinity does not show a quota: a pod limited to 4 CPUs on a 64-core node sees 64 cores."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            text = open(os.path.join(root, quota_file)).read().split()
            quota, period = (text[0], text[1]) if period_file is None else (text[0], open(os.path.join(root, period_file)).read().strip())
            if quota in ("max", "-1"):
                return None
            return max(1, -(-int(quota) // int(period)))
        except (OSError, ValueError, IndexError):
            continue
    return None


def server_cores():
    """The cores this server may compute on: its CPU affinity (which a container's cpuset narrows), at most
    its cgroup's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def thread_counts(cores, instances):
    """Thread counts an `auto` instance may use, from alone (every core) to all instances busy."""
    return sorted({max(1, cores // k) for k in range(1, max(1, instances) + 1)}, reverse=True)


class OpenVinoSession:
    """The ONNX graph on OpenVINO's CPU plugin, called like an ONNX Runtime session (`run(names, feeds)`).
    One compiled model per batch size met, up to MAX_SHAPES: with the batch axis left dynamic the same graph
    ran ~17% slower than compiled for its one batch size (Zen 5); a batch size past them runs on the dynamic one.
    Thread pinning off: OpenVINO pins a one-thread model to the same core in every process, so two instances
    would share one core (measured: 18 frames/s each pinned, 36 unpinned, 2 cores)."""

    MAX_SHAPES = 4

    def __init__(self, path, threads, precision):
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(path)
        self.config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False,
                       "INFERENCE_PRECISION_HINT": precision}
        if threads:  # 0: OpenVINO's default, every core
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.requests = {}  # batch size (None: dynamic) -> infer request
        self.precision = self._request(1).get_compiled_model().get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def _request(self, batch):
        if batch not in self.requests and len(self.requests) >= self.MAX_SHAPES:
            batch = None
        if batch not in self.requests:
            model = self.model.clone()
            if batch is not None:
                model.reshape({i.get_any_name(): [batch] + list(i.get_partial_shape())[1:] for i in model.inputs})
            self.requests[batch] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self.requests[batch]

    def run(self, names, feeds):
        request = self._request(next(iter(feeds.values())).shape[0])
        request.infer(feeds)
        return [request.get_tensor(n).data.copy() for n in names]

    def warm(self):
        request = self._request(1)
        request.infer({i.get_any_name(): np.zeros([1] + [d.get_length() for d in list(i.get_partial_shape())[1:]],
                                                   dtype=i.get_element_type().to_dtype()) for i in request.model_inputs})


class TritonPythonModel:
    def _engine(self, ort, path, providers, threads, spinning):
        if self.engine == ENGINE_OPENVINO:
            return OpenVinoSession(path, threads, self.precision)
        return self._session(ort, path, providers, threads, spinning)

    def _session(self, ort, path, providers, threads, spinning):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (all cores)
        options.inter_op_num_threads = 1
        # contract.PARAM_ORT_SPINNING: "0" makes the pool sleep between ops, so the threads of one instance do
        # not spin on cores another instance (or step) is computing on
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        # a pool that spins after its run would take the cores of the instance that starts next
        options.add_session_config_entry("session.force_spinning_stop", "1" if self.share else "0")
        session = ort.InferenceSession(path, options, providers=providers)
        # ONNX Runtime falls back to CPU silently when the first provider is missing: refuse that at load time
        if session.get_providers()[0] != providers[0]:
            raise RuntimeError(f"{self.name}: providers {providers[0]} asked for, ONNX Runtime gave "
                               f"{session.get_providers()} (available here: {ort.get_available_providers()})")
        return session

    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        self.name = args["model_name"]
        threads = params.get("intra_op_threads", "0")  # contract.PARAM_ORT_THREADS: a number, or AUTO
        # `providers` (comma-separated, default CPU): e.g. "CUDAExecutionProvider,CPUExecutionProvider" on a GPU.
        providers = params.get("providers", "CPUExecutionProvider").split(",")
        spinning = params.get("allow_spinning", "1")
        self.engine = params.get("engine", ENGINE_ORT)  # contract.PARAM_ENGINE
        self.precision = params.get("inference_precision", "f32")  # contract.PARAM_INFERENCE_PRECISION
        if self.engine not in (ENGINE_ORT, ENGINE_OPENVINO):
            raise RuntimeError(f"{self.name}: parameter engine {self.engine!r}: choose {ENGINE_ORT} or {ENGINE_OPENVINO}")
        if self.engine == ENGINE_OPENVINO and providers[0] != "CPUExecutionProvider":
            raise RuntimeError(f"{self.name}: engine {ENGINE_OPENVINO} runs on the CPU; drop the parameter providers")
        self.share = None
        if threads == AUTO and providers[0] != "CPUExecutionProvider":
            counts = [0]  # a GPU provider computes on the device: one session, ONNX Runtime's default CPU threads
        elif threads == AUTO:
            instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
            counts = thread_counts(server_cores(), instances)
            try:
                self.share = ThreadShare(self.name) if instances > 1 else None
            except OSError as exc:  # no shared file (e.g. a read-only /dev/shm): never more than a fair share
                pb_utils.Logger.log_warn(f"{self.name}: auto threads without a share ({exc}); {counts[-1]} thread(s) each")
                counts = counts[-1:]
        else:
            counts = [int(threads)]
        # largest first: the session for `k` busy instances is the first whose count fits cores // (k + 1)
        self.sessions = [(n, self._engine(ort, path, providers, n, spinning)) for n in counts]
        self.session = self.sessions[0][1]
        self.cores = counts[0]
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]
        self.max_batch = int(config.get("max_batch_size", 0))
        if self.engine == ENGINE_OPENVINO:
            self._log_precision()
        for _, session in self.sessions[1:]:  # Triton's warm-up reaches the first one only
            if self.engine == ENGINE_OPENVINO:
                session.warm()
                continue
            session.run(None, {i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape],
                                                dtype=_ORT_DTYPES.get(i.type, np.float32)) for i in session.get_inputs()})

    def _log_precision(self):
        got = self.session.precision
        pb_utils.Logger.log_info(f"{self.name}: OpenVINO CPU, inference precision {got} (asked {self.precision})")
        if got != self.precision:  # e.g. bf16 on a CPU without AVX512_BF16 or AMX: OpenVINO computes in f32
            pb_utils.Logger.log_warn(f"{self.name}: this CPU does not compute in {self.precision}; OpenVINO runs {got}")

    def finalize(self):
        if self.share is not None:
            self.share.close()

    def _error(self, message):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{self.name}: {message}"))

    def _read(self, request):
        arrays = {}
        for name, dtype in self.inputs:
            a = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            if a.dtype != dtype:
                a = a.astype(dtype)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"input {name} contains NaN or inf; send finite values")
            arrays[name] = a
        return arrays

    def _pick(self, busy):
        """The session for `busy` other instances computing: the most threads that fit cores // (busy + 1)."""
        fit = max(1, self.cores // (busy + 1))
        return next((s for n, s in self.sessions if n <= fit), self.sessions[-1][1])

    def _run(self, feeds):
        if self.share is None:
            return self._run_on(self.session, feeds)
        busy = self.share.begin()
        try:
            return self._run_on(self._pick(busy), feeds)
        finally:
            self.share.end()

    def _run_on(self, session, feeds):
        outs = session.run([n for n, _ in self.outputs], feeds)
        return [o.astype(dtype, copy=False) for o, (_, dtype) in zip(outs, self.outputs)]

    def _respond(self, outs):
        """One request's response, or an error naming the step and the output that is not finite."""
        for (name, _), o in zip(self.outputs, outs):
            if o.dtype.kind == "f" and not np.isfinite(o).all():
                return self._error(f"output {name} is not finite (NaN or inf) for this request, refused rather than "
                                   "passed on; its inputs are far outside what the model was trained on")
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(o)) for (name, _), o in zip(self.outputs, outs)])

    def execute(self, requests):
        responses = [None] * len(requests)
        good, batches = [], []
        for i, request in enumerate(requests):
            try:
                batches.append(self._read(request))
                good.append(i)
            except Exception as exc:
                responses[i] = self._error(str(exc))
        if good:
            try:
                feeds = {n: np.concatenate([b[n] for b in batches]) for n, _ in self.inputs}
                outs = self._run(feeds)
                start = 0
                for i, b in zip(good, batches):
                    size = b[self.inputs[0][0]].shape[0]
                    responses[i] = self._respond([o[start:start + size] for o in outs])
                    start += size
            except Exception:
                # isolate the failing request instead of failing the whole batch
                for i, b in zip(good, batches):
                    try:
                        responses[i] = self._respond(self._run(b))
                    except Exception as exc:
                        responses[i] = self._error(f"{self.engine} failed: {type(exc).__name__}: {exc}")
        return responses
