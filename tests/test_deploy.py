"""deploy/ holds to what it promises: every overlay renders with the real `kubectl kustomize`, every
object is valid against the Kubernetes schemas (kubernetes-validate) and passes checkov's policies,
the Deployment runs Triton with the same safe defaults as `promptmad serve`, and every metric the
dashboard, the alert rules and the autoscaler's adapter rule query is one a real tritonserver 2.51
exports (scraped here). All static except the last test, which starts one server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from promptmad import contract

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
GPU_OVERLAYS = ("gpu", "s3", "monitoring")
K8S_VERSION = "1.31.0"  # oldest Kubernetes the manifests target (autoscaling/v2, policy/v1, restricted PSA)
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # monitoring.coreos.com/v1: not in the bundled schemas
# `promptmad serve`'s default ports (export/cli.py; candidates for contract.py)
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
ADMIN_KEY_REF = f"$({contract.ADMIN_KEY_ENV})"  # Kubernetes expands it in args from the container's env
CHECKOV = ROOT / ".venv-tools" / "checkov" / "bin" / "checkov"
ADAPTER_CONFIG = DEPLOY / "monitoring" / "prometheus-adapter-config.yaml"
ALERT_RULES = DEPLOY / "monitoring" / "alert-rules.yaml"
PROMETHEUS_RULE = DEPLOY / "components" / "prometheus-operator" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "dashboards" / "promptmad-triton.json"
# non-Triton series the rules may use: kube-state-metrics and Prometheus' own
OTHER_METRICS = {"kube_deployment_status_replicas_available", "kube_deployment_spec_replicas", "up"}


# --- rendering --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """overlay name -> its objects, rendered by the real kubectl kustomize."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays can only be rendered by the real kustomize")
    out = {}
    for name in OVERLAYS:
        proc = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / name)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize deploy/overlays/{name} failed:\n{proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def the(docs: list[dict], kind: str) -> dict:
    found = objects(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict]) -> dict:
    return the(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_overlays_exist():
    assert {"gpu", "cpu", "s3", "monitoring"} <= set(OVERLAYS)


# --- schemas and policies -------------------------------------------------------------------------
def test_every_object_matches_the_kubernetes_schema(rendered):
    import kubernetes_validate

    docs = [(f"overlays/{name}", d) for name, ds in rendered.items() for d in ds]
    docs.append(("monitoring/prometheus-adapter-config.yaml", yaml.safe_load(ADAPTER_CONFIG.read_text())))
    errors = []
    for where, doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # test_operator_objects checks those
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where} {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_operator_objects(rendered):
    docs = rendered["monitoring"]
    monitor, rule = the(docs, "ServiceMonitor"), the(docs, "PrometheusRule")
    for obj in (monitor, rule):
        assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["metadata"]["namespace"] == "promptmad"
    http = next(s for s in objects(docs, "Service") if s["metadata"]["name"] == "promptmad-http")
    labels = http["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()), "ServiceMonitor selects no Service"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in http["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert yaml.safe_load(ALERT_RULES.read_text())["groups"] == rule["spec"]["groups"], "PrometheusRule != monitoring/alert-rules.yaml"
    assert not any(objects(rendered[n], k) for n in OVERLAYS if n != "monitoring" for k in CRD_KINDS), "CRD objects outside overlays/monitoring"


def test_checkov_passes_every_overlay(rendered, tmp_path):
    assert CHECKOV.is_file(), f"{CHECKOV} is missing: run `bash scripts/setup.sh` (installs checkov into its own venv)"
    for name, docs in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run([str(CHECKOV), "--config-file", str(DEPLOY / ".checkov.yaml"), "-d", str(tmp_path), "-o", "json"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
              for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, "checkov: fix these or skip them with a reason in deploy/.checkov.yaml:\n" + "\n".join(failed)
    assert sum(r["summary"]["passed"] for r in reports) > 0 and proc.returncode == 0, proc.stderr[-2000:]


# --- the Deployment ------------------------------------------------------------------------------------
def test_args_mirror_the_server_defaults(rendered):
    from promptmad.export.server import restricted_api_flags

    for name, docs in rendered.items():
        c = container(docs)
        args, env = c["args"], {e["name"]: e for e in c["env"]}
        for flag in ("--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true", *restricted_api_flags(ADMIN_KEY_REF)):
            assert flag in args, f"{name}: tritonserver lacks {flag}"
        assert env[contract.ADMIN_KEY_ENV]["valueFrom"]["secretKeyRef"]["name"] == "promptmad-admin-key"
        undefined = {v for a in args for v in re.findall(r"\$\((\w+)\)", a)} - set(env)
        assert not undefined, f"{name}: $(VAR) in args without an env var stays literal: {undefined}"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}
        assert {f"--http-port={HTTP_PORT}", f"--grpc-port={GRPC_PORT}", f"--metrics-port={METRICS_PORT}"} <= set(args)


def test_probes_use_the_health_endpoints(rendered):
    for name, docs in rendered.items():
        c = container(docs)
        for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
            assert probe in c, f"{name}: no {probe}"
            get = c[probe]["httpGet"]
            assert get["path"] == path and get["port"] in ("http", HTTP_PORT), f"{name}: {probe} {get}"


def test_pod_is_locked_down(rendered):
    for name, docs in rendered.items():
        pod = the(docs, "Deployment")["spec"]["template"]["spec"]
        c = pod["containers"][0]
        sc, psc = c["securityContext"], pod["securityContext"]
        assert psc["runAsNonRoot"] and psc["runAsUser"] != 0 and psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
        assert not sc.get("privileged") and sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
        assert pod["automountServiceAccountToken"] is False and not pod.get("hostNetwork") and not pod.get("hostIPC"), name
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be writable (read-only root)"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{name}: the Python backend needs /dev/shm"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: {kind}"


def test_gpu_only_where_asked(rendered):
    for name, docs in rendered.items():
        res = container(docs)["resources"]
        gpus = res["limits"].get("nvidia.com/gpu")
        assert (gpus == 1) == (name in GPU_OVERLAYS), f"{name}: nvidia.com/gpu limit {gpus}"
        assert res["requests"].get("nvidia.com/gpu") == gpus


def test_repository_from_a_volume_or_object_storage(rendered):
    for name, docs in rendered.items():
        c = container(docs)
        repo = {e["name"]: e.get("value") for e in c["env"]}["MODEL_REPOSITORY"]
        assert "--model-repository=$(MODEL_REPOSITORY)" in c["args"]
        claims = objects(docs, "PersistentVolumeClaim")
        if name == "s3":
            assert repo.startswith("s3://") and not claims
            assert all(m["mountPath"] != "/models" for m in c["volumeMounts"])
        else:
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == repo)
            assert mount["readOnly"] and len(claims) == 1, name


# --- Services, disruption budget, autoscaling -------------------------------------------------------------
def test_services(rendered):
    for name, docs in rendered.items():
        pod_labels = the(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        services = {s["metadata"]["name"]: s["spec"] for s in objects(docs, "Service")}
        grpc, http = services["promptmad-grpc"], services["promptmad-http"]
        assert grpc.get("clusterIP") == "None", "gRPC clients balance over the pods' addresses: headless"
        assert [(p["name"], p["port"]) for p in grpc["ports"]] == [("grpc", GRPC_PORT)]
        assert {(p["name"], p["port"]) for p in http["ports"]} == {("http", HTTP_PORT), ("metrics", METRICS_PORT)}
        for spec in (grpc, http):
            assert spec["selector"].items() <= pod_labels.items(), f"{name}: a Service selects no pod"


def test_pdb_and_hpa_target_the_deployment(rendered):
    adapter = yaml.safe_load(yaml.safe_load(ADAPTER_CONFIG.read_text())["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    for name, docs in rendered.items():
        dep = the(docs, "Deployment")
        pdb, hpa = the(docs, "PodDisruptionBudget")["spec"], the(docs, "HorizontalPodAutoscaler")["spec"]
        assert pdb["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert hpa["scaleTargetRef"]["name"] == dep["metadata"]["name"] and hpa["minReplicas"] >= 2
        (metric,) = hpa["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# --- monitoring queries ----------------------------------------------------------------------------------
def queries() -> dict[str, list[str]]:
    """file -> the PromQL expressions it holds."""
    adapter = yaml.safe_load(yaml.safe_load(ADAPTER_CONFIG.read_text())["data"]["config.yaml"])
    rules = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    dash = json.loads(DASHBOARD.read_text())
    return {
        "adapter": [q for r in adapter["rules"] for q in (r["seriesQuery"], r["metricsQuery"])],
        "alerts": [r["expr"] for g in rules for r in g["rules"]],
        "dashboard": [t["expr"] for p in dash["panels"] for t in p["targets"]]
                     + [v["definition"] for v in dash["templating"]["list"] if "definition" in v],
    }


def test_queries_name_only_served_models():
    for where, exprs in queries().items():
        for expr in exprs:
            for alternatives in re.findall(r'\bmodel=~?"([^"$]+)"', expr):
                unknown = set(alternatives.split("|")) - set(contract.ALL_MODELS) - set(contract.FUSED_MODELS)
                assert not unknown, f"{where}: {expr!r} names models the repository does not have: {unknown}"
    step_rule = next(e for e in queries()["alerts"] if "preprocess" in e)
    # every step of either layout: the fused default's fused_engine is where its frames queue
    assert set(re.search(r'model=~"([^"]+)"', step_rule).group(1).split("|")) == set(contract.COMPOSING_MODELS)


def test_alerts_and_dashboard_cover_what_the_issue_asks():
    names = {r["alert"] for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]}
    assert {"PromptmadInferenceFailuresRising", "PromptmadQueueTimeHigh", "PromptmadReplicaNotReady"} <= names
    dash = json.loads(DASHBOARD.read_text())
    text = " ".join(p["title"] for p in dash["panels"]).lower()
    for word in ("throughput", "p50", "p99", "queue", "failures"):
        assert word in text, f"the dashboard has no {word} panel"
    assert any(v["name"] == "model" and v["includeAll"] for v in dash["templating"]["list"]), "ensemble and each step: a model variable"


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:nv|kube)_[a-z0-9_]+)", expr)) | ({"up"} if re.search(r"\bup\{", expr) else set())


@pytest.fixture(scope="module")
def exported_families(tiny_repository, rendered) -> set[str]:
    """Metric families a real tritonserver 2.51 exports with the Deployment's --metrics-* flags,
    after one inference (scraped from its /metrics)."""
    from promptmad.export.server import TritonServer
    from tests.helpers import infer_score_http

    metrics_args = tuple(a for a in container(rendered["gpu"])["args"] if a.startswith("--metrics-config"))
    with TritonServer(tiny_repository, extra_args=metrics_args) as server:
        infer_score_http(server.http_url)
        with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
            text = r.read().decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


@pytest.mark.server
def test_queries_use_metrics_triton_exports(exported_families):
    assert "nv_inference_queue_duration_us" in exported_families, sorted(exported_families)
    missing = []
    for where, exprs in queries().items():
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"{where}: no metric in {expr!r}"
            missing += [f"{where}: {n}" for n in sorted(names - exported_families - OTHER_METRICS)]
    assert not missing, f"not exported by tritonserver 2.51 (it exports {sorted(exported_families)}):\n" + "\n".join(missing)
