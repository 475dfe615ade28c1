"""The Helm chart, rendered by the real helm binary (deploy/tools/install-helm.sh installs it) for the default
values and the GPU + S3 + PostgreSQL values file; every rendered object is checked with kubernetes-validate
(strict: unknown fields are errors), KEDA ScaledObjects against the fields KEDA's redis scaler reads, and the
ScaledObjects' Redis list names against the lists kombu really writes on a real Redis.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from deploy_tools import ROOT, helm_binary, run
from services import redis_server  # noqa: F401

CHART = ROOT / "deploy/helm/mstar"
K8S_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def helm() -> str:
    return helm_binary()


def _render(helm: str, *args: str, check: bool = True):
    proc = run([helm, "template", "mstar", str(CHART), "--namespace", "pathology", *args], check=check)
    if not check:
        return proc
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _objs(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


_SCALED_OBJECT_SCHEMA = {  # the ScaledObject fields this chart sets, as KEDA's v1alpha1 CRD types them
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "redis"},
                            "metadata": {
                                "type": "object",
                                "required": ["address", "listName", "listLength"],
                                "additionalProperties": {"type": "string"},  # KEDA trigger metadata: strings
                            },
                        },
                    },
                },
            },
        },
    },
}


def _validate_all(docs: list[dict]) -> None:
    import jsonschema
    import kubernetes_validate

    for d in docs:
        what = f"{d['kind']}/{d['metadata']['name']}"
        if d["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(d, _SCALED_OBJECT_SCHEMA)
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(f"{what} is not a valid Kubernetes {K8S_VERSION} object: {err}") from err


def test_chart_lints(helm: str) -> None:
    proc = run([helm, "lint", str(CHART), "--strict"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run([helm, "lint", str(CHART), "--strict", "-f", str(CHART / "values-gpu-s3-postgres.yaml")], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_values_render_valid_objects(helm: str) -> None:
    docs = _render(helm)
    _validate_all(docs)
    deps = _objs(docs, "Deployment")
    assert set(deps) == {"mstar-gateway", "mstar-triton", "mstar-worker-interactive", "mstar-worker-batch"}

    gw = _pod_spec(deps["mstar-gateway"])["containers"][0]
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert _objs(docs, "HorizontalPodAutoscaler")["mstar-gateway"]["spec"]["maxReplicas"] >= 2
    assert set(_objs(docs, "PodDisruptionBudget")) == {"mstar-gateway", "mstar-triton", "mstar-worker-interactive"}

    # workers: one Deployment per queue, KEDA on the queue's Redis lists, batch scales to zero
    so = _objs(docs, "ScaledObject")
    assert so["mstar-worker-batch"]["spec"]["minReplicaCount"] == 0
    assert so["mstar-worker-interactive"]["spec"]["minReplicaCount"] >= 1
    for name, obj in so.items():
        assert obj["spec"]["scaleTargetRef"]["name"] == name and name in deps
    for q in ("interactive", "batch"):
        w = _pod_spec(deps[f"mstar-worker-{q}"])
        c = w["containers"][0]
        assert c["command"][:4] == ["mstar", "worker", "--queues", q]
        assert "mstar-healthcheck" in " ".join(c["livenessProbe"]["exec"]["command"])
        assert w["terminationGracePeriodSeconds"] > 3600  # a running job may finish (task hard limit 3600 s)
        assert "nvidia.com/gpu" not in json.dumps(c["resources"])

    # Triton on CPU by default; reachable only from this release's pods
    triton = _pod_spec(deps["mstar-triton"])
    assert _env(triton["containers"][0])["TRITON_MODEL_CONFIG"]["value"] == "cpu"
    mounts = {m["mountPath"]: m for m in triton["containers"][0]["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and not mounts["/trt-cache"].get("readOnly")
    assert _objs(docs, "Service")["mstar-triton"]["spec"]["type"] == "ClusterIP"
    netpol = _objs(docs, "NetworkPolicy")
    assert {"mstar-triton", "mstar-redis", "mstar-postgresql"} <= set(netpol)
    keda = netpol["mstar-redis"]["spec"]["ingress"][1]  # KEDA's scaler must reach Redis to read queue lengths
    assert keda["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    assert keda["ports"] == [{"protocol": "TCP", "port": 6379}]
    rule = netpol["mstar-triton"]["spec"]["ingress"]
    assert rule == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "mstar"}}}],
            "ports": [{"protocol": "TCP", "port": p} for p in (8000, 8001, 8002)],
        }
    ]

    # secrets, blobs on a PVC, the bundle from the pre-install Job onto its PVC, in-chart Redis + PostgreSQL
    secret = _objs(docs, "Secret")["mstar-secrets"]["stringData"]
    assert {"MSTAR_API_KEYS", "MSTAR_DATABASE_URL", "POSTGRES_PASSWORD"} <= set(secret)
    assert secret["MSTAR_DATABASE_URL"].startswith("postgresql+psycopg://mstar:")
    assert set(_objs(docs, "PersistentVolumeClaim")) == {"mstar-data", "mstar-bundle"}
    job = _objs(docs, "Job")["mstar-bundle-init"]
    assert "pre-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    assert _pod_spec(job)["containers"][0]["command"] == ["/usr/local/bin/mstar-bundle-init"]
    assert _pod_spec(job)["containers"][0]["image"] == "mstar-train:0.1.0"  # trains the demo: needs torch
    assert set(_objs(docs, "StatefulSet")) == {"mstar-redis", "mstar-postgresql"}
    env = _env(gw)
    assert "MSTAR_METRICS_PUBLIC" not in env  # /metrics stays behind an admin key unless the operator opens it
    assert env["MSTAR_BROKER_URL"]["value"] == "redis://mstar-redis:6379/0"
    assert env["MSTAR_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "mstar-secrets"

    # every mSTAR pod runs as non-root
    for obj in [*deps.values(), job, *_objs(docs, "StatefulSet").values()]:
        assert _pod_spec(obj)["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]


def test_gpu_s3_postgres_values_render_valid_objects(helm: str) -> None:
    docs = _render(helm, "-f", str(CHART / "values-gpu-s3-postgres.yaml"))
    _validate_all(docs)
    deps = _objs(docs, "Deployment")
    triton = _pod_spec(deps["mstar-triton"])
    c = triton["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in triton["tolerations"]
    assert _env(c)["TRITON_MODEL_CONFIG"]["value"] == ""  # config.pbtxt: KIND_GPU + TensorRT
    assert c["image"] == "registry.example.org/mstar/mstar-triton:0.1.0"
    assert deps["mstar-triton"]["spec"]["replicas"] == 2

    # S3 instead of the data PVC; secrets and the database from the existing Secret; no in-chart PostgreSQL
    assert "Secret" not in {d["kind"] for d in docs}
    assert set(_objs(docs, "PersistentVolumeClaim")) == {"mstar-bundle"}
    assert set(_objs(docs, "StatefulSet")) == {"mstar-redis"}
    gw = _env(_pod_spec(deps["mstar-gateway"])["containers"][0])
    assert gw["MSTAR_BLOB_URL"]["value"] == "s3://pathology-mstar/prod"
    assert gw["MSTAR_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "mstar-secrets"
    assert gw["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True

    # the bundle is imported from the exports volume, never trained here
    job = _pod_spec(_objs(docs, "Job")["mstar-bundle-init"])
    jenv = _env(job["containers"][0])
    assert jenv["MSTAR_BUNDLE_SOURCE"]["value"].startswith("/import/")
    assert jenv["MSTAR_BUNDLE_BUILD_DEMO"]["value"] == "0"
    assert job["containers"][0]["image"] == "registry.example.org/mstar/mstar-gateway:0.1.0"  # no torch needed
    assert {"name": "import", "persistentVolumeClaim": {"claimName": "mstar-model-exports"}} in job["volumes"]

    netpol = _objs(docs, "NetworkPolicy")["mstar-triton"]["spec"]["ingress"]
    assert netpol[1]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert netpol[1]["ports"] == [{"protocol": "TCP", "port": 8002}]  # monitoring reaches metrics only


def test_gpu_workers_and_bundle_image_mode(helm: str) -> None:
    docs = _render(
        helm,
        "--set", "gateway.metricsPublic=true",
        "--set", "workers.gpu=true", "--set", "workers.backend=onnxruntime", "--set", "triton.enabled=false",
        "--set", "bundle.mode=initContainer", "--set", "bundle.image=registry.example.org/mstar/bundle:2026-11",
    )  # fmt: skip
    _validate_all(docs)
    deps = _objs(docs, "Deployment")
    assert "mstar-triton" not in deps and "mstar-triton" not in _objs(docs, "NetworkPolicy")
    w = _pod_spec(deps["mstar-worker-interactive"])
    c = w["containers"][0]
    assert c["image"].endswith("/mstar-worker-gpu:0.1.0") or c["image"] == "mstar-worker-gpu:0.1.0"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--pool" in c["command"]
    assert "MSTAR_TRITON_URL" not in _env(c) and _env(c)["MSTAR_BACKEND"]["value"] == "onnxruntime"
    assert w["initContainers"][0]["image"] == "registry.example.org/mstar/bundle:2026-11"
    assert "Job" not in {d["kind"] for d in docs}
    assert set(_objs(docs, "PersistentVolumeClaim")) == {"mstar-data"}
    gw = _env(_pod_spec(deps["mstar-gateway"])["containers"][0])
    assert gw["MSTAR_METRICS_PUBLIC"]["value"] == "true"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "bundle.mode=magic"], "bundle.mode must be job or initContainer"),
        (["--set", "bundle.mode=initContainer"], "bundle.image is required"),
        (["--set", "redis.enabled=false"], "redis.address (host:port) is required"),
        (["--set", "blobs.s3.enabled=true"], "blobs.s3.url (s3://bucket/prefix) is required"),
    ],
)
def test_chart_refuses_incomplete_values_with_a_reason(helm: str, args: list[str], message: str) -> None:
    proc = _render(helm, *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr


def test_chart_monitoring_files_match_the_compose_ones() -> None:
    assert (CHART / "files/alerts.yml").read_bytes() == (ROOT / "deploy/prometheus/alerts.yml").read_bytes()
    dash = (ROOT / "deploy/grafana/dashboards/mstar.json").read_bytes()
    assert (CHART / "files/mstar-dashboard.json").read_bytes() == dash


def test_keda_lists_are_the_lists_kombu_writes(helm: str, redis_server, tmp_path: Path) -> None:  # noqa: F811
    """Publish a job to each queue through the service's own Celery app on a real Redis: the list that holds it
    must be one the queue's ScaledObject watches, or KEDA would never scale the workers up (or batch up from 0)."""
    import redis

    from service.config import Settings
    from service.jobs.celery_app import PRIORITY, QUEUES, make_celery

    triggers = {
        name.removeprefix("mstar-worker-"): {t["metadata"]["listName"] for t in obj["spec"]["triggers"]}
        for name, obj in _objs(_render(helm), "ScaledObject").items()
    }
    assert set(triggers) == set(QUEUES)
    app = make_celery(Settings(broker_url=redis_server.url, data_dir=tmp_path))
    r = redis.Redis.from_url(redis_server.url)
    try:
        for queue in QUEUES:
            r.flushdb()
            app.send_task("mstar.deploy_probe", args=["job"], queue=queue, routing_key=queue, priority=PRIORITY[queue])
            lists = {k.decode() for k in r.keys("*") if r.type(k) == b"list" and r.llen(k) > 0}
            assert lists, f"no Redis list holds the message published to {queue}"
            assert lists <= triggers[queue], f"{queue}: message in {lists}, ScaledObject watches {triggers[queue]}"
    finally:
        app.close()
        r.flushdb()


def test_chart_values_match_the_images() -> None:
    """The commands and paths the chart uses exist in the images it names."""
    service_df = (ROOT / "docker/service.Dockerfile").read_text()
    assert "/usr/local/bin/mstar-healthcheck" in service_df
    for df in ("train.Dockerfile", "service.Dockerfile"):
        assert "/usr/local/bin/mstar-bundle-init" in (ROOT / "docker" / df).read_text()
    assert re.search(r"mkdir -p /trt-cache", (ROOT / "docker/triton.Dockerfile").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001 and "--uid 10001" in service_df


@pytest.mark.parametrize(
    "values", [[], ["-f", str(CHART / "values-gpu-s3-postgres.yaml"), "--set", "workers.gpu=true"]]
)
def test_scrape_jobs_carry_the_names_the_alerts_watch(helm: str, tmp_path: Path, values: list[str]) -> None:
    """The alerts (`absent(up{job="mstar-worker"})`, ...) and the dashboard name scrape jobs: the chart's scrape
    config must define exactly those jobs (promtool accepts it with the alert rules), and each job must keep the
    metrics port of the pods it is named for, and only theirs (Prometheus anchors relabel regexes)."""
    from deploy_tools import tool

    docs = _render(helm, *values)
    scrape = yaml.safe_load(_objs(docs, "ConfigMap")["mstar-prometheus-scrape"]["data"]["scrape.yml"])
    jobs = {j["job_name"]: j for j in scrape}
    watched = set(re.findall(r'job="([^"]+)"', (ROOT / "deploy/prometheus/alerts.yml").read_text()))
    watched |= set(re.findall(r'job=\\"([^"\\]+)\\"', (ROOT / "deploy/grafana/dashboards/mstar.json").read_text()))
    assert set(jobs) == watched == {"mstar-gateway", "mstar-worker", "triton"}

    token = tmp_path / "token"
    token.write_text("k" * 32)
    for job in scrape:
        if "authorization" in job:  # the token file is a Secret mounted into Prometheus in the cluster
            job["authorization"]["credentials_file"] = str(token)
        # Debian's promtool is built without Kubernetes discovery: it checks the rest of each job (relabelling,
        # authorization) with a static target in its place
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod", "namespaces": {"names": ["pathology"]}}]
        job["static_configs"] = [{"targets": ["pod:9808"]}]
    shutil.copy(ROOT / "deploy/prometheus/alerts.yml", tmp_path / "alerts.yml")
    config = {"rule_files": ["alerts.yml"], "scrape_configs": scrape}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")])

    def kept_by(labels: dict, port_name: str) -> list[str]:
        key = ";".join([labels["app.kubernetes.io/instance"], labels["app.kubernetes.io/component"], port_name])
        return [n for n, j in jobs.items() if re.fullmatch(j["relabel_configs"][0]["regex"], key)]

    scraped = {}
    for name, dep in _objs(docs, "Deployment").items():
        tpl = dep["spec"]["template"]
        port = int(tpl["metadata"]["annotations"]["prometheus.io/port"])
        for c in tpl["spec"]["containers"]:
            for p in c.get("ports", []):
                kept = kept_by(tpl["metadata"]["labels"], p["name"])
                if p["containerPort"] == port:
                    assert len(kept) == 1, (name, p, kept)
                    scraped[name] = kept[0]
                else:
                    assert not kept, (name, p, kept)  # not a metrics port: no target
    assert scraped == {
        "mstar-gateway": "mstar-gateway",
        "mstar-worker-interactive": "mstar-worker",
        "mstar-worker-batch": "mstar-worker",
        "mstar-triton": "triton",
    }
    gateway_auth = "authorization" in jobs["mstar-gateway"]
    assert gateway_auth and not any("authorization" in jobs[n] for n in ("mstar-worker", "triton"))
