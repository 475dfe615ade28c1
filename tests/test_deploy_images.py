"""Images, the compose stack and its monitoring, validated without a container engine (none runs here).

What runs for real: hadolint on every Dockerfile, shellcheck on every script the images run, each image's exact
`pip install` line resolved against requirements/lock.txt with `pip install --dry-run`, `docker compose config`
(the Compose v2 binary), promtool on the Prometheus config and alert rules (with rule unit tests), the bundle init
script on real bundle folders and tarballs, and the health check against a real HTTP server and a real Celery
worker on a real Redis.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from deploy_tools import ROOT, compose_binary, run, tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from services import free_port, postgres_url, redis_server  # noqa: F401

DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
LOCK = ROOT / "requirements/lock.txt"
PY = sys.executable


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        assert version and re.fullmatch(r"[A-Za-z0-9._+!-]+", version), f"lock line is not name==version: {line!r}"
        pins[canonicalize_name(name)] = version
    return pins


# --- Dockerfiles and scripts ---------------------------------------------------------------------------------


def test_dockerfiles_are_hadolint_clean() -> None:
    assert {p.name for p in DOCKERFILES} >= {
        "service.Dockerfile",
        "worker-gpu.Dockerfile",
        "triton.Dockerfile",
        "train.Dockerfile",
    }
    hadolint = tool("hadolint")
    for f in DOCKERFILES:
        proc = run([hadolint, "--no-color", str(f)], check=False)
        assert proc.returncode == 0, f"hadolint {f.name}:\n{proc.stdout}{proc.stderr}"


def test_dockerfiles_are_multistage_nonroot_with_healthchecks() -> None:
    for f in DOCKERFILES:
        text = f.read_text()
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        assert users and users[-1] not in ("root", "0"), f"{f.name}: the final stage must run as a non-root user"
        assert re.search(r"^HEALTHCHECK\s", text, re.M), f"{f.name}: no HEALTHCHECK"
        froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
        if f.name != "triton.Dockerfile":  # the official Triton image already is the runtime
            assert len(froms) >= 2, f"{f.name}: not multi-stage"
        for arg in re.findall(r"^ARG\s+\w+_IMAGE=(\S+)", text, re.M):
            assert ":" in arg and not arg.endswith(":latest"), f"{f.name}: base image {arg} is not pinned by tag"
        if f.name != "triton.Dockerfile":  # images that read slides: numba's kernels cached where any uid writes
            assert "NUMBA_CACHE_DIR=/tmp/" in text, f"{f.name}: no writable NUMBA_CACHE_DIR"


def test_shell_scripts_are_shellcheck_clean() -> None:
    scripts = [
        *(ROOT / "docker").glob("*.sh"),
        *(ROOT / "deploy/tools").glob("*.sh"),
        ROOT / "requirements/make-lock.sh",
    ]
    run([tool("shellcheck"), *map(str, scripts)])


def _dockerignore_included(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: patterns in order, the last one matching decides (`!` re-includes)."""
    included = True
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        parts = re.split(r"(\*\*|\*|\?)", pat.rstrip("/"))
        glob = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
        regex = "".join(glob.get(x, re.escape(x)) for x in parts)
        if re.fullmatch(regex, rel) or any(re.fullmatch(regex, str(p)) for p in Path(rel).parents if str(p) != "."):
            included = neg
    return included


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    patterns = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for rel in (
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        "out/demo/result.json",
        ".git/HEAD",
        "model_repository/mstar_patch_encoder/1/model.onnx",
        "tests/conftest.py",
        ".cache/tools/helm",
    ):
        assert not _dockerignore_included(rel, patterns), f"{rel} would be sent to the Docker daemon"
    copied = set()
    for f in DOCKERFILES:
        for src in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", f.read_text(), re.M):
            copied.update(src.split())
    assert copied, "no COPY found"
    for src in copied:
        probe = src if (ROOT / src).is_file() else f"{src.rstrip('/')}/__init__.py"
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert _dockerignore_included(probe, patterns), f"COPY {src} is excluded by .dockerignore"


# --- the lock and each image's install step --------------------------------------------------------------------


def test_lock_pins_every_declared_dependency() -> None:
    import tomllib

    pins = _lock_pins()
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra, items in meta["optional-dependencies"].items():
        reqs += [r for r in items if not r.startswith("mstar[")]
        assert extra in ("api", "serve", "gpu", "gpu-decode", "worker", "triton", "pacs", "s3", "train", "dev", "all")
    for r in map(Requirement, reqs):
        name = canonicalize_name(r.name)
        assert name in pins, f"{r.name} (pyproject.toml) has no pin in requirements/lock.txt: run `make lock`"
        assert r.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, needs {r}"
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            c = Requirement(line)
            assert c.specifier.contains(pins[canonicalize_name(c.name)]), f"lock breaks constraints.txt: {c}"
    assert "onnxruntime-gpu" in pins and "onnxruntime" in pins


_INSTALL = re.compile(r"pip install [^\n]*-c requirements/lock\.txt '\.\[([a-z0-9,]+)\]'")
# image -> (distributions that must not be there, distributions that must be there)
_IMAGE_RULES = {
    "service.Dockerfile": ({"torch", "onnxruntime-gpu"}, {"onnxruntime", "celery", "tritonclient", "fastapi"}),
    "worker-gpu.Dockerfile": ({"torch", "onnxruntime"}, {"onnxruntime-gpu", "celery", "tritonclient"}),
    "train.Dockerfile": ({"onnxruntime-gpu"}, {"torch", "timm", "onnxruntime"}),
}


def test_image_install_steps_resolve_against_the_lock(tmp_path: Path) -> None:
    """Each Dockerfile's own `pip install` line, resolved from scratch (as in a fresh image) with --dry-run.

    The three resolutions run side by side: they mostly wait on the package index."""
    procs = {}
    for dockerfile in sorted(_IMAGE_RULES):
        m = _INSTALL.search((ROOT / "docker" / dockerfile).read_text())
        assert m, f"{dockerfile}: no `pip install -c constraints.txt -c requirements/lock.txt '.[...]'` line"
        report = tmp_path / f"{dockerfile}.json"
        cmd = [PY, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-build-isolation", "--quiet",
               "--report", str(report), "--disable-pip-version-check", "-c", "constraints.txt",
               "-c", "requirements/lock.txt", f".[{m.group(1)}]"]  # fmt: skip
        out = (tmp_path / f"{dockerfile}.log").open("w")
        procs[dockerfile] = (subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT), report, m.group(1))
    pins = _lock_pins()
    for dockerfile, (proc, report, extras) in procs.items():
        rc = proc.wait(600)
        log = (tmp_path / f"{dockerfile}.log").read_text()
        assert rc == 0, f"{dockerfile}: pip could not resolve .[{extras}]:\n{log[-3000:]}"
        installs = json.loads(report.read_text())["install"]
        resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
        resolved.pop("mstar")
        unpinned = sorted(n for n in resolved if n not in pins)
        assert not unpinned, f"{dockerfile}: resolved distributions missing from the lock: {unpinned}"
        drift = {n: (v, pins[n]) for n, v in resolved.items() if v != pins[n]}
        assert not drift, f"{dockerfile}: resolved versions differ from the lock: {drift}"
        absent, present = _IMAGE_RULES[dockerfile]
        assert not (absent & resolved.keys()), f"{dockerfile} would install {sorted(absent & resolved.keys())}"
        assert present <= resolved.keys(), f"{dockerfile} lacks {sorted(present - resolved.keys())}"


def test_assert_dists_guard_fails_the_build_on_a_forbidden_distribution() -> None:
    guard = str(ROOT / "docker/assert_dists.py")
    assert run([PY, guard, "--absent", "no-such-dist-xyz", "--present", "pytest"], check=False).returncode == 0
    bad = run([PY, guard, "--absent", "pytest"], check=False)
    assert bad.returncode == 1 and "forbidden distribution(s) installed: pytest" in bad.stderr
    missing = run([PY, guard, "--present", "no-such-dist-xyz"], check=False)
    assert missing.returncode == 1 and "missing: no-such-dist-xyz" in missing.stderr


def test_tensorrt_cache_lives_outside_the_model_repository() -> None:
    from training.export.triton import render_config

    assert "/models" not in str(render_config.__kwdefaults__["trt_cache"])
    for cfg in (ROOT / "model_repository").glob("*/config.pbtxt"):
        for path in re.findall(r'"trt_engine_cache_path" value: "([^"]+)"', cfg.read_text()):
            assert path.startswith("/trt-cache/"), f"{cfg}: TensorRT cache {path} is not on the /trt-cache volume"


# --- bundle init (the compose init service and the Helm hook Job run this script) ----------------------------


#: what `mstar export` / `make demo` write into model_repository/ (ignored by git): a fresh clone has none of it
_BUILT = shutil.ignore_patterns("*.onnx", "*.onnx.data", "*.bin", "model.py", "__pycache__")


def _fake_weights_bundle(dest: Path) -> Path:
    """The committed manifest and Triton configs, with small stand-in weight files and their real checksums.

    The init script's contract is "a manifest whose every file exists and matches its checksum", which this
    exercises exactly; whether the ONNX graphs run is the export tests' business."""
    from service.inference.bundle import sha256_file

    shutil.copytree(ROOT / "model_repository", dest, ignore=_BUILT)  # as committed, even after `make demo`
    manifest = json.loads((dest / "bundle.json").read_text())

    def fill(rel: str) -> str:
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(hashlib.sha256(rel.encode()).digest() * 64)
        return sha256_file(p)

    for m in manifest["models"]:
        m["sha256"] = fill(m["file"])
    for key in ("tokenizer", "report_vocab"):
        if manifest.get(key):
            manifest[key]["sha256"] = fill(manifest[key]["path"])
    if manifest.get("report_vocab"):  # one word per decoder logit, as load_bundle checks
        from inference_fixtures import stand_in_vocab

        vocab = dest / manifest["report_vocab"]["path"]
        vocab.write_text(stand_in_vocab(manifest))
        manifest["report_vocab"]["sha256"] = sha256_file(vocab)
    (dest / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return dest


def _bundle_init(models: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "MSTAR_PYTHON": PY, "MSTAR_BUNDLE_DIR": str(models), "PYTHONPATH": str(ROOT), **env}
    return run(["bash", str(ROOT / "docker/bundle-init.sh")], check=False, env=full)


def test_bundle_init_imports_verifies_and_keeps_a_bundle(tmp_path: Path) -> None:
    src = _fake_weights_bundle(tmp_path / "export" / "mstar-bundle")
    tarball = tmp_path / "bundle.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(src, arcname="mstar-bundle")
    models = tmp_path / "models"
    models.mkdir()
    (models / "stale.txt").write_text("left by an older bundle")

    first = _bundle_init(models, MSTAR_BUNDLE_SOURCE=str(tarball), MSTAR_BUNDLE_BUILD_DEMO="0")
    assert first.returncode == 0, first.stderr
    assert "bundle ready" in first.stdout
    assert (models / "bundle.json").is_file() and not (models / "stale.txt").exists()
    assert not (models / ".incoming").exists()
    from service.inference.bundle import load_bundle

    load_bundle(models, verify_checksums=True)

    again = _bundle_init(models, MSTAR_BUNDLE_BUILD_DEMO="0")  # a restart: nothing to do, nothing rebuilt
    assert again.returncode == 0 and "already holds a verified bundle" in again.stdout

    # a corrupted weight file is noticed and the import replaces the bundle from the folder source
    victim = next(models.glob("mstar_patch_encoder/1/*"))
    victim.write_bytes(b"corrupted")
    fixed = _bundle_init(models, MSTAR_BUNDLE_SOURCE=str(src), MSTAR_BUNDLE_BUILD_DEMO="0")
    assert fixed.returncode == 0, fixed.stderr
    load_bundle(models, verify_checksums=True)


def test_bundle_init_refuses_bad_sources_with_one_line(tmp_path: Path) -> None:
    models = tmp_path / "models"
    nothing = _bundle_init(models, MSTAR_BUNDLE_BUILD_DEMO="0")
    assert nothing.returncode == 2 and "error [bundle_missing]" in nothing.stderr

    odd = tmp_path / "bundle.zip"
    odd.write_bytes(b"PK")
    wrong = _bundle_init(models, MSTAR_BUNDLE_SOURCE=str(odd))
    assert wrong.returncode == 2 and "error [bundle_source]" in wrong.stderr

    src = _fake_weights_bundle(tmp_path / "src")
    next(src.glob("mstar_aggregator/1/*")).write_bytes(b"tampered")
    tampered = _bundle_init(models, MSTAR_BUNDLE_SOURCE=str(src))
    assert tampered.returncode == 2 and "error [bundle_invalid]" in tampered.stderr
    assert "fails its checksum" in tampered.stderr
    assert not (models / "bundle.json").exists(), "a bundle that fails verification must not be moved in"


def test_triton_launcher_refuses_an_empty_or_incomplete_repository(tmp_path: Path) -> None:
    launcher = str(ROOT / "docker/triton-entrypoint.sh")
    empty = run(["bash", launcher], check=False, env={**os.environ, "MSTAR_MODEL_REPOSITORY": str(tmp_path)})
    assert empty.returncode == 2 and "error [bundle_missing]" in empty.stderr
    repo = tmp_path / "fresh-clone"
    shutil.copytree(ROOT / "model_repository", repo, ignore=_BUILT)  # configs but no weights: a fresh clone
    fresh = run(["bash", launcher], check=False, env={**os.environ, "MSTAR_MODEL_REPOSITORY": str(repo)})
    assert fresh.returncode == 2 and "error [bundle_incomplete]" in fresh.stderr
    assert "mstar_patch_encoder" in fresh.stderr


# --- health checks --------------------------------------------------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_http_healthcheck_against_a_real_server() -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    check = [PY, str(ROOT / "docker/healthcheck.py"), "http"]
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        assert run([*check, f"{base}/healthz"], check=False).returncode == 0
        bad = run([*check, f"{base}/readyz"], check=False)
        assert bad.returncode == 1 and "503" in bad.stderr
    finally:
        srv.shutdown()
    down = run([*check, f"http://127.0.0.1:{free_port()}/healthz"], check=False)
    assert down.returncode == 1 and "unhealthy" in down.stderr


def test_celery_healthcheck_pings_the_named_worker(redis_server, tmp_path: Path) -> None:  # noqa: F811
    app_mod = tmp_path / "pingapp.py"
    app_mod.write_text(  # a worker of the service's own Celery app, with nothing but the ping to answer
        "from service.config import Settings\nfrom service.jobs.celery_app import make_celery\n"
        f"app = make_celery(Settings(broker_url={redis_server.url!r}, data_dir={str(tmp_path)!r}))\n"
    )
    worker = subprocess.Popen(
        [
            PY,
            "-m",
            "celery",
            "-A",
            "pingapp:app",
            "worker",
            "--pool",
            "solo",
            "--hostname",
            "mstar@probe-host",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "WARNING",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}"},
        stdout=(tmp_path / "worker.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    check = [PY, str(ROOT / "docker/healthcheck.py"), "--timeout", "2", "celery"]
    env = {**os.environ, "MSTAR_BROKER_URL": redis_server.url, "PYTHONPATH": f"{ROOT}:{tmp_path}"}
    try:
        deadline = time.monotonic() + 60
        while run([*check, "mstar@probe-host"], check=False, env=env).returncode != 0:
            assert worker.poll() is None, "the Celery worker exited"
            assert time.monotonic() < deadline, "the worker never answered the health check's ping"
        other = run([*check, "mstar@another-host"], check=False, env=env)
        assert other.returncode == 1 and "did not answer" in other.stderr
    finally:
        worker.terminate()
        worker.wait(30)
    t0 = time.monotonic()
    no_broker = run([*check], check=False, env={**env, "MSTAR_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert no_broker.returncode == 1 and "unhealthy" in no_broker.stderr
    assert time.monotonic() - t0 < 30, "a lost broker must fail the check promptly, not retry for minutes"
    unset = run([*check], check=False, env={k: v for k, v in env.items() if k != "MSTAR_BROKER_URL"})
    assert unset.returncode == 1 and "no broker configured" in unset.stderr


# --- compose --------------------------------------------------------------------------------------------------


def _compose_config(*files: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [compose_binary()]
    for f in files:
        args += ["-f", str(ROOT / "deploy" / f)]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MSTAR_", "TRITON_", "COMPOSE_"))}
    return run([*args, "config", "--format", "json"], check=False, env={**base, **(env or {})})


def test_compose_stack_config(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = _compose_config("compose.yaml", env={"MSTAR_ADMIN_KEY": "k" * 32})
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    svc = cfg["services"]
    assert set(svc) == {"bundle-init", "redis", "postgres", "triton", "gateway", "worker", "prometheus", "grafana"}
    assert svc["worker"]["deploy"]["replicas"] == 2
    for name in ("triton", "gateway", "worker"):
        assert svc[name]["depends_on"]["bundle-init"]["condition"] == "service_completed_successfully"
        models = [v for v in svc[name]["volumes"] if v["target"] == "/models"]
        assert models and models[0]["source"] == "bundle" and models[0].get("read_only"), f"{name}: /models"
    assert svc["worker"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert {v["target"]: v.get("read_only", False) for v in svc["triton"]["volumes"]}["/trt-cache"] is False
    assert svc["triton"]["environment"]["TRITON_MODEL_CONFIG"] == "cpu"
    for name in ("redis", "postgres"):
        assert svc[name]["healthcheck"]["test"], f"{name} has no health check"
    # /metrics answers admin keys only: Prometheus scrapes with the admin key, mounted as a compose secret
    assert cfg["secrets"]["mstar_admin_key"]["environment"] == "MSTAR_ADMIN_KEY"
    assert svc["prometheus"]["secrets"][0]["target"] == "/run/secrets/mstar_admin_key"
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    gw_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "mstar-gateway")
    assert gw_job["authorization"]["credentials_file"] == "/run/secrets/mstar_admin_key"
    # the images' targets exist, and every bind mount points into the repository
    service_df = (ROOT / "docker/service.Dockerfile").read_text()
    for name in ("gateway", "worker"):
        assert re.search(rf"^FROM \S+ AS {svc[name]['build']['target']}$", service_df, re.M)
    for s in svc.values():
        for v in s.get("volumes", []):
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), f"bind mount source {v['source']} does not exist"
    env = svc["gateway"]["environment"]
    assert json.loads(env["MSTAR_API_KEYS"])[0]["key"] == "k" * 32
    from service.config import Settings

    for k, v in env.items():  # the service reads these exactly as the containers will pass them
        monkeypatch.setenv(k, v)
    settings = Settings(_env_file=None)
    assert settings.broker_url == "redis://redis:6379/0" and settings.blob_url is None
    assert settings.api_keys[0].admin and settings.db_url.startswith("postgresql+psycopg://")


def test_compose_refuses_to_start_without_an_admin_key() -> None:
    proc = _compose_config("compose.yaml")
    assert proc.returncode != 0 and "set MSTAR_ADMIN_KEY" in proc.stderr


def test_compose_gpu_override_puts_triton_on_gpus() -> None:
    proc = _compose_config("compose.yaml", "compose.gpu.yaml", env={"MSTAR_ADMIN_KEY": "k" * 32})
    assert proc.returncode == 0, proc.stderr
    triton = json.loads(proc.stdout)["services"]["triton"]
    assert triton["environment"]["TRITON_MODEL_CONFIG"] == ""
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


# --- Prometheus, alerts, Grafana ------------------------------------------------------------------------------

# Metrics only the Celery workers' own endpoint exports (`mstar worker --metrics-port`). Prometheus' `up` comes with
# every scrape; nv_* are Triton's own metrics.
WORKER_ONLY_METRICS = {"mstar_worker_jobs_running"}
TRITON_METRICS = {
    "nv_inference_count",
    "nv_inference_request_success",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_memory_total_bytes",
}


def _exported_labels() -> dict[str, set[str]]:
    """Every series name the gateway's /metrics and the workers' own endpoint carry (histograms with their
    suffixes), each with its label names: the real registries, with one finished job observed so that labelled
    series exist."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from service.api.metrics import Metrics
    from service.jobs.execute import JobOutcome
    from service.obs.job_metrics import JobMetrics

    stats = ({"queued": 1}, {"interactive": {"depth": 1.0, "oldest_age_s": 2.0}})
    gateway = Metrics(lambda: stats)
    gateway.request_seconds.labels("GET", "/jobs/{job_id}", "200").observe(0.01)
    worker = CollectorRegistry()
    outcome = JobOutcome(
        "j", "failed", error_code="no_tissue", stage_seconds={"embed": 1.0}, n_patches=9, backend_seconds={"m": [0.1]}
    )
    for metrics in (gateway.jobs, JobMetrics(worker)):
        metrics.observe(outcome)
    labels: dict[str, set[str]] = {}
    for registry in (gateway.registry, worker):
        for fam in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in fam.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def _metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", re.sub(r'"[^"]*"|\[[^\]]*\]', "", expr)))
    return {w for w in words if w.startswith(("mstar_", "nv_")) or w == "up"}


def _strip_suffix(name: str) -> str:
    return re.sub(r"_(bucket|count|sum|total)$", "", name)


def test_prometheus_config_and_alert_rules(tmp_path: Path) -> None:
    promtool = tool("promtool")
    prom = tmp_path / "prometheus.yml"
    shutil.copy(ROOT / "deploy/prometheus/alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "mstar_admin_key").write_text("k" * 32)  # compose mounts it as a secret in /run/secrets
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    prom.write_text(text.replace("/etc/prometheus/", "").replace("/run/secrets/", f"{tmp_path}/"))
    run([promtool, "check", "config", str(prom)])
    run([promtool, "check", "rules", str(ROOT / "deploy/prometheus/alerts.yml")])
    # unit tests: each alert fires on the series that should raise it and stays quiet on a healthy stack
    proc = run([promtool, "test", "rules", "alerts.test.yml"], cwd=ROOT / "deploy/prometheus")
    assert "SUCCESS" in proc.stdout + proc.stderr
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"][0]["rules"]
    assert {"MstarQueueStalled", "MstarJobFailureRateHigh", "MstarNoWorkers"} <= {r["alert"] for r in rules}
    scraped = {j["job_name"] for j in yaml.safe_load(prom.read_text())["scrape_configs"]}
    for r in rules:
        for job in re.findall(r'job="([^"]+)"', r["expr"]):
            assert job in scraped, f"alert {r['alert']} watches job {job}, which Prometheus does not scrape"


def test_grafana_dashboard_queries_are_valid_promql_on_known_metrics(tmp_path: Path) -> None:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/mstar.json").read_text())
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    exprs = []
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid, f"panel {p['title']!r} uses an unprovisioned data source"
        exprs += [t["expr"] for t in p["targets"]]
    # promtool parses every query (as recording rules): a typo in PromQL fails here, not in front of an operator
    rules = {
        "groups": [{"name": "dashboard", "rules": [{"record": f"dash:q{i}", "expr": e} for i, e in enumerate(exprs)]}]
    }
    (tmp_path / "dash.yml").write_text(yaml.safe_dump(rules))
    run([tool("promtool"), "check", "rules", str(tmp_path / "dash.yml")])

    exported = _exported_labels()
    alert_exprs = [
        r["expr"] for r in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"][0]["rules"]
    ]
    used = set().union(*(_metric_names(e) for e in [*exprs, *alert_exprs]))
    known = set(exported) | WORKER_ONLY_METRICS | TRITON_METRICS | {"up"}
    unknown = {n for n in used if n not in known and _strip_suffix(n) not in WORKER_ONLY_METRICS}
    assert not unknown, f"dashboard/alerts use metrics nobody exports: {sorted(unknown)}"
    # and only labels those metrics carry: a selector's matchers on its own metric, `by (...)` on the query's
    # metrics together (`le` and the target labels Prometheus adds are on every series)
    added = {"job", "instance", "le"}
    for e in [*exprs, *alert_exprs]:
        mine = {n for n in _metric_names(e) if n in exported}
        for name, matchers in re.findall(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}", e):
            if name in mine:
                wrong = set(re.findall(r"([a-z_][a-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers)) - exported[name] - added
                assert not wrong, f"{e!r}: {name} has no label {sorted(wrong)} (it has {sorted(exported[name])})"
        if mine and mine == _metric_names(e):
            carried = set().union(*(exported[n] for n in mine)) | added
            for group in re.findall(r"\bby\s*\(([^)]*)\)", e):
                wrong = {g.strip() for g in group.split(",") if g.strip()} - carried
                assert not wrong, f"{e!r} groups by {sorted(wrong)}, which {sorted(mine)} do not carry"
    # what issue 19 asks the dashboard to show
    for needed in (
        "mstar_queue_depth",
        "mstar_queue_oldest_age_seconds",
        "mstar_jobs",
        "mstar_patches_per_second_bucket",
        "mstar_job_stage_duration_seconds_bucket",
        "nv_gpu_utilization",
        "nv_inference_count",
    ):
        assert needed in used, f"the dashboard does not show {needed}"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/mstar.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# Read from the job database at scrape time by every gateway replica (service.api.metrics._StoreCollector), with
# the label each is broken down by
STORE_GAUGES = {"mstar_jobs": "state", "mstar_queue_depth": "queue", "mstar_queue_oldest_age_seconds": "queue"}


def test_dashboard_counts_each_job_once_behind_several_gateways(tmp_path: Path) -> None:
    """Every gateway replica (the chart runs two, its HPA up to six) reports the same database's job counts, queue
    depths and ages: the panels reading them, evaluated by promtool on two replicas' series, must show one
    database's numbers, not their sum."""
    dash = json.loads((ROOT / "deploy/grafana/dashboards/mstar.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"] if _metric_names(t["expr"]) & set(STORE_GAUGES)]
    assert len(exprs) == 3, exprs  # queue depth, oldest job, jobs by state
    values = {
        "mstar_jobs": {"queued": 3, "running": 1},
        "mstar_queue_depth": {"batch": 2, "interactive": 1},
        "mstar_queue_oldest_age_seconds": {"batch": 120, "interactive": 5},
    }
    series = [
        {"series": f'{m}{{job="mstar-gateway",instance="gw{i}:8000",{label}="{k}"}}', "values": f"{v}x10"}
        for m, label in STORE_GAUGES.items()
        for k, v in values[m].items()
        for i in (1, 2)
    ]
    checks = []
    for e in exprs:
        (metric,) = _metric_names(e)
        label = STORE_GAUGES[metric]
        samples = [{"labels": f'{{{label}="{k}"}}', "value": v} for k, v in values[metric].items()]
        checks.append({"expr": e, "eval_time": "5m", "exp_samples": samples})
    (tmp_path / "none.yml").write_text("groups: []\n")
    test = {"input_series": series, "promql_expr_test": checks, "interval": "1m"}
    (tmp_path / "dash.test.yml").write_text(yaml.safe_dump({"rule_files": ["none.yml"], "tests": [test]}))
    proc = run([tool("promtool"), "test", "rules", "dash.test.yml"], cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_commands_boot_natively_and_pass_the_image_health_checks(
    redis_server,  # noqa: F811
    postgres_url,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The compose stack's gateway and worker commands, with its environment (hosts pointed at a real Redis and
    PostgreSQL here), start, and the images' own health checks pass: the gateway answers /healthz, and the worker
    named `mstar@%h` answers a ping addressed to `mstar@<hostname>`, the health check's default."""
    proc = _compose_config("compose.yaml", env={"MSTAR_ADMIN_KEY": "k" * 32})
    assert proc.returncode == 0, proc.stderr
    svc = json.loads(proc.stdout)["services"]
    remap = {
        "MSTAR_BROKER_URL": redis_server.url,
        "MSTAR_DATABASE_URL": postgres_url,
        "MSTAR_DATA_DIR": str(tmp_path / "data"),
        "MSTAR_BUNDLE_DIR": str(ROOT / "model_repository"),
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("MSTAR_")}
    env = {**base, **svc["gateway"]["environment"], **remap, "PYTHONPATH": str(ROOT)}
    assert set(remap) <= set(svc["gateway"]["environment"])
    mstar = str(Path(PY).parent / "mstar")
    port = free_port()
    cmds = re.findall(r'^CMD (\["mstar", .*\])$', (ROOT / "docker/service.Dockerfile").read_text(), re.M)
    args = json.loads(cmds[-1])[1:]  # the last stage, the default target, is the gateway
    assert args[0] == "serve"
    args[args.index("--port") + 1] = str(port)
    worker_cmd = svc["worker"]["command"]
    assert worker_cmd[:2] == ["mstar", "worker"] and "mstar@%h" in worker_cmd
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [
        subprocess.Popen([mstar, *args], env=env, stdout=(logs / "gw").open("w"), stderr=subprocess.STDOUT),
        subprocess.Popen([mstar, *worker_cmd[1:]], env=env, stdout=(logs / "wk").open("w"), stderr=subprocess.STDOUT),
    ]
    checks = {
        "gateway": [PY, str(ROOT / "docker/healthcheck.py"), "http", f"http://127.0.0.1:{port}/healthz"],
        "worker": [PY, str(ROOT / "docker/healthcheck.py"), "--timeout", "2", "celery"],
    }
    try:
        deadline = time.monotonic() + 120
        pending = dict(checks)
        while pending:
            for name, cmd in list(pending.items()):
                if run(cmd, check=False, env=env).returncode == 0:
                    pending.pop(name)
            for p, log in zip(procs, ("gw", "wk"), strict=True):
                assert p.poll() is None, f"{log} exited {p.returncode}:\n{(logs / log).read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"health checks still failing: {sorted(pending)}"
            time.sleep(1)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
