"""Helpers of the fleet tests: a server's own count of answered requests (its statistics endpoint),
and a real Prometheus (Debian's package) scraping local tritonservers, queried through its HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from promptmad import contract

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ADAPTER_CONFIG = DEPLOY / "monitoring" / "prometheus-adapter-config.yaml"
SCRAPE_INTERVAL_S = 1  # the deploy/ config scrapes every 15 s; a test cannot wait that long
NAMESPACE = "promptmad"  # the label the adapter rule matches on, set here as Kubernetes would


def success_count(http_url: str, model: str = contract.MODEL_NAME) -> int:
    """Requests the server answered for `model` since it started (GET /v2/models/<model>/stats)."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=5) as r:
        stats = json.loads(r.read())["model_stats"]
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)


def counts_reaching(http_urls: list[str], model: str, expected: int, timeout: float = 30.0) -> list[int]:
    """Each server's success_count of `model`, read once their sum reaches `expected` or at the timeout
    (a server records a request's statistics after it answered, so the client may see the answer first)."""
    deadline = time.monotonic() + timeout
    counts = [success_count(u, model) for u in http_urls]
    while sum(counts) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = [success_count(u, model) for u in http_urls]
    return counts


def adapter_query(pods: list[str]) -> str:
    """deploy/'s prometheus-adapter metricsQuery, filled in as the adapter fills it for the HPA: grouped
    by pod, matching the namespace and the pods asked about."""
    config = yaml.safe_load(yaml.safe_load(ADAPTER_CONFIG.read_text())["data"]["config.yaml"])
    template = config["rules"][0]["metricsQuery"]
    matchers = f'namespace="{NAMESPACE}",pod=~"{"|".join(pods)}"'
    return template.replace("<<.GroupBy>>", "pod").replace("<<.LabelMatchers>>", matchers)


class Prometheus:
    """`with Prometheus(tmp, {"pod-a": "127.0.0.1:8002"}, port) as prom: prom.query(expr)`: scrapes each
    metrics address every SCRAPE_INTERVAL_S with the namespace and pod labels of Kubernetes."""

    def __init__(self, workdir: Path, targets: dict[str, str], port: int):
        self.workdir, self.targets, self.port = Path(workdir), targets, port
        self._proc: subprocess.Popen | None = None

    def _config(self) -> Path:
        jobs = [{"targets": [addr], "labels": {"namespace": NAMESPACE, "pod": pod}} for pod, addr in self.targets.items()]
        config = {"global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
                  "scrape_configs": [{"job_name": "promptmad-triton", "static_configs": jobs}]}
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def __enter__(self) -> "Prometheus":
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        assert Path(binary).is_file(), "Debian's prometheus is not installed: bash scripts/setup.sh (apt-get install prometheus)"
        log = open(self.workdir / "prometheus.log", "wb")
        self._proc = subprocess.Popen(
            [binary, f"--config.file={self._config()}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.wait(lambda: len(self.query("up == 1")) == len(self.targets), 60, "every target scraped")
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=30)

    def query(self, expr: str) -> dict[str, float]:
        """The instant query's value per pod label ({} when there is no series or Prometheus is not up yet)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.loads(r.read())
        except OSError:
            return {}
        assert body["status"] == "success", body
        return {s["metric"].get("pod", ""): float(s["value"][1]) for s in body["data"]["result"]}

    def wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "prometheus.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"Prometheus: not {what} within {timeout}s:\n{log}")
            time.sleep(0.5)
