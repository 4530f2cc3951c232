"""deploy/: Prometheus, alerts, Grafana, compose and Kubernetes files agree with the app.

Nothing here needs Docker, a cluster or a network: the files are parsed, their
metric names checked against what ``Metrics.create()`` exports, their settings
against ``adpulse.settings.documented()``, and ``promtool`` (when installed, as
``make test`` does as root) checks the Prometheus files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from adpulse.metrics import Metrics
from adpulse.settings import Settings, documented

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "adpulse.json"
K8S = DEPLOY / "k8s"
SETTINGS = {var for var, _, _ in documented()}
# Series Prometheus itself adds to every target.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
METRIC_REF = re.compile(r"\b(adpulse_[a-z0-9_]+|up)\b")


def exported_series() -> set[str]:
    """Every series name the app's /metrics can carry, with the exposition's suffixes."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    names = set()
    for family in Metrics.create().registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def referenced(expr: str) -> set[str]:
    return set(METRIC_REF.findall(expr))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


# -- metrics -----------------------------------------------------------------------------
def test_exported_series_follow_prometheus_naming() -> None:
    names = exported_series()
    assert "adpulse_events_total" in names
    assert "adpulse_decision_latency_seconds_bucket" in names  # bench-ok: a metric name
    assert "adpulse_consumer_lag_messages" in names
    assert "adpulse_build_info" in names
    assert all(n.startswith("adpulse_") for n in names)


def test_build_info_carries_the_installed_version() -> None:
    text = Metrics.create().exposition().decode()
    assert re.search(r'^adpulse_build_info\{version="[^"]+"\} 1\.0$', text, re.M), text


def test_no_metric_is_labelled_by_user() -> None:
    for family in Metrics.create().registry.collect():
        for collector_labels in (s.labels for s in family.samples):
            assert not {"user", "user_id"} & set(collector_labels)
    assert "user" not in (PROMETHEUS / "alerts.yml").read_text().replace("user-events", "")


# -- Prometheus ----------------------------------------------------------------------------
def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not on PATH: `make test` installs Debian's prometheus as root")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_prometheus_config() -> None:
    done = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    done = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_on_synthetic_series_as_their_unit_tests_say() -> None:
    """deploy/prometheus/alerts_test.yml: joiner stalled, budget exhausted early."""
    done = promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_worker_metrics_and_loads_the_rules() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = Settings().web_port
    assert all(t.endswith(f":{port}") for t in job["static_configs"][0]["targets"])


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "AdpulseWorkerDown",
        "AdpulseConsumerLagGrowing",
        "AdpulseDecisionLatencyP99OverBudget",
        "AdpulseFreshnessP99OverBudget",
        "AdpulseDeadLetterSpike",
        "AdpulseModelSwapRefused",
        "AdpulseJoinerStalled",
        "AdpulseBudgetExhaustedEarly",
    } <= names
    for rule in rules:
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]


def test_alert_rules_only_use_series_the_app_exports() -> None:
    exported = exported_series() | SCRAPE_SERIES
    for rule in alert_rules():
        refs = referenced(rule["expr"])
        assert refs, rule["alert"]
        assert refs <= exported, f"{rule['alert']}: unknown {sorted(refs - exported)}"


# -- Grafana ---------------------------------------------------------------------------------
def test_dashboard_loads_with_unique_panel_ids_and_the_provisioned_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    uid = datasource["datasources"][0]["uid"]
    for panel in dash["panels"]:
        assert panel["title"] and panel["targets"], panel["id"]
        assert panel["datasource"]["uid"] == uid
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/dashboards.yml")
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_queries_only_use_series_the_app_exports() -> None:
    exported = exported_series() | SCRAPE_SERIES
    covered: set[str] = set()
    for expr in dashboard_exprs():
        refs = referenced(expr)
        assert refs, expr
        assert refs <= exported, f"{expr}: unknown {sorted(refs - exported)}"
        covered |= refs
    for must in ("adpulse_events_total", "adpulse_decision_latency_seconds_bucket",
                 "adpulse_consumer_lag_messages", "adpulse_model_info"):  # fmt: skip
        assert must in covered


# -- docker-compose ------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")
    return data


def test_compose_workers_agree_with_settings_and_prometheus_targets() -> None:
    services = compose()["services"]
    workers = sorted(name for name in services if name.startswith("worker-"))
    assert len(workers) >= 2
    volumes = set()
    for name in workers:
        svc = services[name]
        env = svc["environment"]
        assert set(env) <= SETTINGS, f"{name}: {sorted(set(env) - SETTINGS)} not settings"
        s = Settings.from_env(env)
        assert s.bootstrap == "kafka:19092"
        assert s.web_host == "0.0.0.0"  # reachable by Prometheus from another container
        assert s.partitions == Settings.from_env(services["topics"]["environment"]).partitions
        # User data sits behind the web port: reachable on the compose network only.
        assert "ports" not in svc, f"{name} publishes its web port on the host"
        assert s.api_token_file, f"{name}: no ADPULSE_API_TOKEN_FILE"
        (volume,) = [v for v in svc["volumes"] if v.endswith(f":{s.data_dir}")]
        volumes.add(volume.split(":")[0])
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert f"{svc['hostname']}:{s.web_port}" in prometheus_targets()
    assert len(volumes) == len(workers), "each worker its own volume"


def test_compose_workers_share_one_pseudonym_key_written_once_by_keygen() -> None:
    services = compose()["services"]
    workers = [svc for name, svc in services.items() if name.startswith("worker-")]
    keygen = services["keygen"]
    (key_volume,) = keygen["volumes"]
    volume, secrets_dir = key_volume.split(":")
    assert "/secrets/pseudonym-key" in " ".join(keygen["command"])
    assert "/secrets/api-token" in " ".join(keygen["command"])
    assert secrets_dir == "/secrets"
    files = set()
    for svc in workers:
        key_file = Path(Settings.from_env(svc["environment"]).pseudonym_key_file)
        assert f"{volume}:{key_file.parent}:ro" in svc["volumes"]
        assert key_file.name == "pseudonym-key"
        files.add(key_file)
        assert "ADPULSE_PSEUDONYM_KEY" not in svc["environment"]  # never inline
    assert len(files) == 1, "every worker reads the same key"
    worker_base = compose().get("x-worker") or {}
    assert worker_base["depends_on"]["keygen"]["condition"] == "service_completed_successfully"


def prometheus_targets() -> list[str]:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    targets: list[str] = config["scrape_configs"][0]["static_configs"][0]["targets"]
    return targets


def test_compose_mounts_the_prometheus_and_grafana_provisioning() -> None:
    services = compose()["services"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    for name, svc in services.items():
        for key in svc.get("environment", {}):
            assert not key.startswith("ADPULSE_") or key in SETTINGS, f"{name}: {key}"


def test_dockerfile_installs_the_way_ci_does() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^RUN make venv\b", dockerfile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: \$\(STAMP\)", makefile, re.M), "CI's make test installs via venv"


# -- Kubernetes ------------------------------------------------------------------------------
def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            assert doc["metadata"]["name"], path.name
            docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_workers_are_a_statefulset_with_storage_probes_and_scrape_annotations() -> None:
    docs = manifests()
    config = docs["ConfigMap"]["data"]
    assert set(config) <= SETTINGS, sorted(set(config) - SETTINGS)
    s = Settings.from_env(config)
    sts, svc = docs["StatefulSet"], docs["Service"]
    assert sts["apiVersion"] == "apps/v1"
    assert svc["spec"]["clusterIP"] == "None"  # headless
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    pod = sts["spec"]["template"]
    assert pod["metadata"]["labels"] == sts["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["selector"] == pod["metadata"]["labels"]
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(s.web_port)
    assert notes["prometheus.io/path"] == "/metrics"
    (container,) = pod["spec"]["containers"]
    assert container["image"]
    (port,) = container["ports"]
    assert port["containerPort"] == s.web_port
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    sources = container["envFrom"]
    assert {"configMapRef": {"name": docs["ConfigMap"]["metadata"]["name"]}} in sources
    assert any(src.get("secretRef", {}).get("optional") for src in sources)
    env = {e["name"]: e for e in container.get("env", [])}
    for name in env:
        assert name in SETTINGS or name in ("POD_NAME", "POD_NAMESPACE"), name
    # Each pod names itself through the headless service (forwarded lookups).
    url = env["ADPULSE_CANONICAL_URL"]["value"]
    assert url == (
        f"http://$(POD_NAME).{svc['metadata']['name']}.$(POD_NAMESPACE).svc.cluster.local:"
        f"{s.web_port}"
    )
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]]["mountPath"] == str(s.data_dir)


def test_k8s_pods_read_the_pseudonym_key_from_one_required_secret() -> None:
    docs = manifests()
    s = Settings.from_env(docs["ConfigMap"]["data"])
    assert s.pseudonymise and s.pseudonym_key_file and not s.pseudonym_key
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    key = Path(s.pseudonym_key_file)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(key.parent)]
    assert mount["readOnly"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "adpulse-pseudonym-key"
    assert not volume["secret"].get("optional"), "no key: the worker must not start"
    assert all(e["name"] != "ADPULSE_PSEUDONYM_KEY" for e in container.get("env", []))


def test_k8s_pods_read_the_api_token_from_one_required_secret() -> None:
    docs = manifests()
    s = Settings.from_env(docs["ConfigMap"]["data"])
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    token = Path(s.api_token_file)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(token.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "adpulse-api-token"
    assert not volume["secret"].get("optional"), "no token: the worker must not start"


def test_embedded_kafka_is_the_version_compose_runs() -> None:
    from adpulse.kafkabroker import KAFKA_VERSION, POM

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["services"]["kafka"]["image"]
    pom = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    assert pom is not None
    assert image == f"apache/kafka:{KAFKA_VERSION}" and pom.group(1) == KAFKA_VERSION
