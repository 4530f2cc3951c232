"""deploy/: Prometheus, alerts, Grafana, compose and Kubernetes files agree with the app.

Nothing here needs Docker, a cluster or a network: the files are parsed, their
metric names checked against what ``Metrics.create()`` exports, their settings
against ``adpulse.core.settings.documented()``, and ``promtool`` (when installed, as
``make test`` does as root) checks the Prometheus files.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement

from adpulse.cli import build_parser
from adpulse.commands.catalog import cmd_catalog_publish, cmd_catalog_synth
from adpulse.commands.decide import cmd_decide, request_body
from adpulse.commands.kafka import cmd_replay_taobao
from adpulse.core.metrics import Metrics
from adpulse.core.settings import Settings, documented
from schemas import first_error

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
    """deploy/prometheus/alerts_test.yml: each alert fires, rendered exactly, or stays quiet."""
    done = promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_rule_test_that_fires_it_and_one_where_it_stays_quiet() -> None:
    cases = load_yaml(PROMETHEUS / "alerts_test.yml")
    assert cases["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in cases["tests"]:
        for case in test["alert_rule_test"]:
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
            for alert in case["exp_alerts"]:  # promtool compares all of them, exactly
                assert {"summary", "description", "runbook"} <= set(alert["exp_annotations"])
    names = {r["alert"] for r in alert_rules()}
    assert fires | quiet <= names, f"cases for no rule: {sorted((fires | quiet) - names)}"
    assert not names - fires, f"no case fires {sorted(names - fires)}"
    assert not names - quiet, f"no healthy case for {sorted(names - quiet)}"


def scrape_jobs() -> dict[str, dict[str, Any]]:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_prometheus_scrapes_worker_trainer_and_promoter_metrics_and_loads_the_rules() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    jobs = scrape_jobs()
    assert len(jobs) == len(config["scrape_configs"]), "job names are unique"
    s = Settings()
    ports = {"adpulse": s.web_port, "adpulse-trainer": s.trainer_port,
             "adpulse-promoter": s.promoter_port}  # fmt: skip
    assert set(jobs) == set(ports)
    for name, job in jobs.items():
        assert job["metrics_path"] == "/metrics"
        (static,) = job["static_configs"]
        assert static["targets"], name
        assert all(t.endswith(f":{ports[name]}") for t in static["targets"]), name


def jobs_selected(expr: str) -> set[str]:
    """The scrape jobs a query selects by a ``job="x"`` or ``job=~"x|y"`` matcher."""
    jobs: set[str] = set()
    for op, value in re.findall(r'\bjob\s*(=~|=)\s*"([^"]*)"', expr):
        jobs |= set(value.split("|")) if op == "=~" else {value}
    return jobs


def test_every_job_the_alerts_and_panels_select_is_scraped_and_every_scraped_job_alerted() -> None:
    """A job name typed differently in prometheus.yml and a rule is an alert that never
    fires: every job a rule or panel selects is a scrape job, and every scrape job has a
    rule that selects it (at least its process being down)."""
    jobs = set(scrape_jobs())
    alerted: set[str] = set()
    for rule in alert_rules():
        selected = jobs_selected(rule["expr"])
        assert selected <= jobs, f"{rule['alert']}: no scrape job {sorted(selected - jobs)}"
        alerted |= selected
    for expr in dashboard_exprs():
        assert jobs_selected(expr) <= jobs, expr
    assert alerted == jobs, f"no alert selects job {sorted(jobs - alerted)}"
    # The process-down alerts select each job by its ``up`` series.
    down = {job for rule in alert_rules() if rule["expr"].startswith("up{")
            for job in jobs_selected(rule["expr"])}  # fmt: skip
    assert down == jobs


def test_progressive_validation_alerts_follow_the_trainer_and_promoter_settings() -> None:
    """The trainer's gauges are alerted on over its largest default window (the smaller
    one is too noisy), and the calibration band is the promoter's own drift threshold."""
    s = Settings()
    largest = max(int(w) for w in s.trainer_windows.split(","))
    rules = {r["alert"]: r for r in alert_rules()}
    for name in ("AdpulseModelMiscalibrated", "AdpulseModelAucBelowChance"):
        assert set(re.findall(r'window="(\d+)"', rules[name]["expr"])) == {str(largest)}, name
    expr = rules["AdpulseModelMiscalibrated"]["expr"]
    drift = s.canary_max_calibration_drift
    assert re.findall(r"< ([0-9.]+)", expr) == [str(round(1 - drift, 6))], expr
    assert re.findall(r"> ([0-9.]+)", expr) == [str(round(1 + drift, 6))], expr


def test_every_alert_has_a_row_in_the_operations_alert_table() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    rows = set(re.findall(r"^\| `(Adpulse\w+)` \|", text, re.M))
    names = {r["alert"] for r in alert_rules()}
    assert names == rows, f"missing {sorted(names - rows)}, stale {sorted(rows - names)}"


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "AdpulseWorkerDown",
        "AdpulseConsumerStalled",
        "AdpulseDecisionsNotLogged",
        "AdpulseConsumerLagGrowing",
        "AdpulseDecisionLatencyP99OverBudget",
        "AdpulseFreshnessP99OverBudget",
        "AdpulseDeadLetterSpike",
        "AdpulseRequestsShed",
        "AdpulseModelSwapRefused",
        "AdpulseJoinerStalled",
        "AdpulseBudgetExhaustedEarly",
        "AdpulseModelRolledBack",
        "AdpulseTrainingProcessDown",
        "AdpulseTrainerNotLearning",
        "AdpulseTrainerNoCandidate",
        "AdpulseModelMiscalibrated",
        "AdpulseModelAucBelowChance",
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
                 "adpulse_consumer_lag_messages", "adpulse_model_info",
                 # the trainer's progressive validation and progress, the promoter's events
                 "adpulse_trainer_auc", "adpulse_trainer_calibration", "adpulse_trainer_logloss",
                 "adpulse_trainer_labels_total", "adpulse_trainer_candidates_total",
                 "adpulse_model_events_total"):  # fmt: skip
        assert must in covered


# -- docker-compose ------------------------------------------------------------------------
# The generic structure (keys, types, depends_on conditions, healthcheck shape) is the
# compose-spec's business: its JSON schema, as check-jsonschema ships it (a dev
# dependency), validates the file. The tests after that check what only adpulse knows.
COMPOSE = ROOT / "docker-compose.yml"
SHARED_DATA = ROOT.parent / "shared" / "data"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def compose_spec_errors(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema against the compose-spec schema it vendors: no network needed."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_compose_file_is_valid_under_the_compose_spec(tmp_path: Path) -> None:
    done = compose_spec_errors(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr
    # The validator is not vacuous: the same file with a misspelt key and an unknown
    # depends_on condition is refused, and both mistakes are named.
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE.read_text()
    assert "restart: unless-stopped" in text and "service_completed_successfully" in text
    broken.write_text(
        text.replace("restart: unless-stopped", "restrat: unless-stopped").replace(
            "service_completed_successfully", "service_finished"
        )
    )
    done = compose_spec_errors(broken)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "'restrat' does not match" in done.stdout, done.stdout
    assert "'service_finished' is not one of" in done.stdout, done.stdout


def adpulse_services() -> dict[str, dict[str, Any]]:
    """The services that run the adpulse image (entrypoint ``adpulse``)."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if isinstance(svc.get("build"), dict) and svc["build"]["dockerfile"] == "deploy/Dockerfile"
    }


def adpulse_commands(svc: dict[str, Any]) -> list[list[str]]:
    """The adpulse argument lists a service runs: its exec-form command (the image's
    entrypoint is ``adpulse``), or each ``adpulse ...`` line of its ``sh -c`` script, with
    compose's ``$$`` unescaped."""
    if "entrypoint" not in svc:
        return [list(svc["command"])]
    assert svc["entrypoint"] == ["sh", "-c"], svc["entrypoint"]
    (script,) = svc["command"]
    lines = [line.strip() for line in script.replace("$$", "$").splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("adpulse ")]


def parsed(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the real CLI's parser; a mistake fails the test with argparse's line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"adpulse {shlex.join(argv)}: {err.getvalue().strip()}")


# Subcommands that import PyTorch: their services build the Dockerfile's train stage
# (the promoter checks a candidate's ONNX against its PyTorch weights with it).
TRAIN_COMMANDS = {"train", "trainer", "promoter"}


def test_compose_services_run_real_adpulse_subcommands() -> None:
    services = adpulse_services()
    assert {"topics", "catalog", "replay", "requests", "worker-1", "worker-2", "model",
            "trainer", "promoter"} <= set(services)  # fmt: skip
    stages = {s.name for s in dockerfile_stages()}
    for name, svc in services.items():
        commands = adpulse_commands(svc)
        assert commands, f"{name} runs no adpulse command"
        for argv in commands:
            parsed(argv)
        # The lean image (deploy/Dockerfile's runtime stage) unless it trains.
        trains = any(argv[0] in TRAIN_COMMANDS for argv in commands)
        assert svc["build"]["target"] == ("train" if trains else "runtime"), name
        assert svc["build"]["target"] in stages, name
        for key in svc.get("environment", {}):
            assert not key.startswith("ADPULSE_") or key in SETTINGS, f"{name}: {key}"


def handlers(name: str) -> list[argparse.Namespace]:
    return [parsed(argv) for argv in adpulse_commands(compose()["services"][name])]


def test_compose_produces_decisions_end_to_end() -> None:
    """`docker compose up` publishes a catalog, replays events and sends ad requests to
    the workers once they can answer; no Docker here, so this reads the plan: which
    command each service runs (parsed by the real CLI), against what, after what."""
    services = compose()["services"]
    workers = sorted(name for name in services if name.startswith("worker-"))
    (catalog,) = handlers("catalog")
    assert catalog.handler in (cmd_catalog_synth, cmd_catalog_publish)
    (replay,) = handlers("replay")
    assert replay.handler is cmd_replay_taobao
    for name in ("catalog", "replay"):
        assert services[name]["environment"]["ADPULSE_BOOTSTRAP"] == "kafka:19092", name
        assert services[name]["depends_on"]["topics"]["condition"] == (
            "service_completed_successfully"
        )
    requests = services["requests"]
    sent = handlers("requests")
    assert sent and all(args.handler is cmd_decide for args in sent)
    token_file = Settings.from_env(requests["environment"]).api_token_file
    for args in sent:
        # The request the service sends is one the ad-requests contract accepts...
        assert first_error("ad-requests", request_body(args)) is None
        # ...to a worker of this file, at its web port.
        url = urlsplit(args.url)
        assert url.hostname in workers and url.path in ("", "/"), args.url
        s = Settings.from_env(services[url.hostname]["environment"])
        assert url.port == s.web_port
        assert token_file == s.api_token_file, "requests needs the workers' API token"
    # Requests wait for the events and for every worker to answer /health 200...
    deps = requests["depends_on"]
    assert deps["replay"]["condition"] == "service_completed_successfully"
    for name in workers:
        assert deps[name]["condition"] == "service_healthy", name
        worker = services[name]
        s = Settings.from_env(worker["environment"])
        check = " ".join(worker["healthcheck"]["test"])
        assert f"http://127.0.0.1:{s.web_port}/health" in check, check
        # ...and a worker starts after the catalog is published, so healthy (the catalog
        # read up to the end it found at start) means it has the ads to fill with.
        assert worker["depends_on"]["catalog"]["condition"] == "service_completed_successfully"
        # The secrets volume the token is read from is the workers' one.
        assert f"pseudonym-key:{Path(token_file).parent}:ro" in requests["volumes"]
        assert f"pseudonym-key:{Path(s.api_token_file).parent}:ro" in worker["volumes"]


def test_compose_data_files_exist_where_the_services_read_them() -> None:
    """The sample the catalog, replay and requests read is mounted from ../shared/data."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (the repository's data folder beside it)")
    for name, svc in adpulse_services().items():
        mounts = dict(v.split(":")[:2][::-1] for v in svc.get("volumes", ()))
        script = " ".join(" ".join(argv) for argv in adpulse_commands(svc))
        script += " " + " ".join(svc["command"])
        for path in re.findall(r"/data/[\w./-]+", script):
            host = mounts.get("/data")
            assert host is not None, f"{name} reads {path} without mounting /data"
            assert (ROOT / host / Path(path).relative_to("/data")).is_file(), (name, path)


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
        assert adpulse_commands(svc) == [["worker", "--loglevel", "info"]]
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
        assert svc["depends_on"]["keygen"]["condition"] == "service_completed_successfully"
    assert len(files) == 1, "every worker reads the same key"


def prometheus_targets(job: str = "adpulse") -> list[str]:
    targets: list[str] = scrape_jobs()[job]["static_configs"][0]["targets"]
    return targets


def service_running(command: str) -> tuple[str, dict[str, Any]]:
    """The one compose service that runs ``adpulse COMMAND``."""
    (found,) = [(name, svc) for name, svc in adpulse_services().items()
                if any(argv[:1] == [command] for argv in adpulse_commands(svc))]  # fmt: skip
    return found


def test_compose_runs_one_trainer_and_one_promoter_on_the_workers_model_registry() -> None:
    """The registry is one named volume at ADPULSE_MODEL_DIR in the workers (read-only),
    the trainer and promoter (read-write) and the `model` service, which writes the first
    version (with model.pt, what the trainer warm-starts from) before any of them starts."""
    services = compose()["services"]
    declared = set(compose()["volumes"])
    workers = {n: svc for n, svc in services.items() if n.startswith("worker-")}
    trainer_name, trainer = service_running("trainer")
    promoter_name, promoter = service_running("promoter")
    model_name, model = service_running("train")
    (train,) = handlers(model_name)
    assert train.generate or train.input, "the first version is trained on something"
    registry: set[str] = set()
    for name, svc in {**workers, trainer_name: trainer, promoter_name: promoter,
                      model_name: model}.items():  # fmt: skip
        s = Settings.from_env(svc["environment"])
        assert s.model_dir, f"{name}: no ADPULSE_MODEL_DIR"
        (mount,) = [v for v in svc["volumes"] if v.split(":")[1] == s.model_dir]
        volume, _, *mode = mount.split(":")
        registry.add(volume)
        assert mode == (["ro"] if name in workers else []), f"{name}: {mount}"
        if name != model_name:
            assert svc["depends_on"][model_name]["condition"] == "service_completed_successfully"
    assert len(registry) == 1 and registry <= declared, registry
    assert train.out == Settings.from_env(model["environment"]).model_dir
    # The trainer's checkpoint survives a restart: DATA_DIR in a volume of its own.
    t = Settings.from_env(trainer["environment"])
    (ckpt,) = [v.split(":")[0] for v in trainer["volumes"] if v.split(":")[1] == str(t.data_dir)]
    assert ckpt in declared
    assert all(not v.startswith(f"{ckpt}:") for w in workers.values() for v in w["volumes"])
    # Prometheus scrapes each at its port, in the job the alerts and panels select.
    p = Settings.from_env(promoter["environment"])
    assert prometheus_targets("adpulse-trainer") == [f"{trainer['hostname']}:{t.trainer_port}"]
    assert prometheus_targets("adpulse-promoter") == [f"{promoter['hostname']}:{p.promoter_port}"]
    assert {trainer_name, promoter_name} <= set(services["prometheus"]["depends_on"])


def test_compose_mounts_the_prometheus_and_grafana_provisioning() -> None:
    services = compose()["services"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana


# -- Dockerfile ------------------------------------------------------------------------------
# No Docker engine here, so the image is never built in the suite: these tests read
# deploy/Dockerfile (a static check) and import the code without the extras it leaves out.
@dataclass
class Stage:
    name: str
    base: str
    lines: list[str] = field(default_factory=list)  # instructions, continuations joined


def dockerfile_stages() -> list[Stage]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.fullmatch(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I):
            stages.append(Stage(name=m.group(2) or str(len(stages)), base=m.group(1)))
        else:
            stages[-1].lines.append(line)
    return stages


def stage_closure(stages: list[Stage], name: str) -> list[Stage]:
    """The stage and every stage whose files it inherits (FROM) or copies (COPY --from)."""
    by_name = {s.name: s for s in stages}
    seen: list[Stage] = []
    todo = [name]
    while todo:
        stage = by_name[todo.pop()]
        if stage in seen:
            continue
        seen.append(stage)
        todo += [stage.base] if stage.base in by_name else []
        for line in stage.lines:
            todo += [m for m in re.findall(r"--from=(\S+)", line) if m in by_name]
    return seen


def pip_installs(stage: Stage, options: bool = False) -> list[str]:
    """The requirement arguments of the stage's ``pip install`` commands (or the options)."""
    args: list[str] = []
    for line in stage.lines:
        if not line.startswith("RUN "):
            continue
        for command in re.split(r"&&|;", line[4:]):
            words = shlex.split(command)
            if "pip" in (Path(w).name for w in words[:1]) and words[1:2] == ["install"]:
                args += [w for w in words[2:] if w.startswith("-") == options]
    return args


def extras(requirement: str) -> set[str]:
    m = re.fullmatch(r"[^\[]*(?:\[([^\]]*)\])?", requirement)
    assert m is not None, requirement
    return {e.strip() for e in (m.group(1) or "").split(",") if e.strip()}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_runtime_stage_installs_no_dev_or_train_extra() -> None:
    """Static (no Docker engine here): the default target is the runtime stage, and what
    it holds was installed as adpulse alone; the train extra is a stage of its own."""
    stages = dockerfile_stages()
    assert stages[-1].name == "runtime", "the last stage is the default target"
    project = pyproject()["project"]
    dev = {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in project["optional-dependencies"]["dev"]}
    runtime_installs = [r for s in stage_closure(stages, "runtime") for r in pip_installs(s)]
    assert "." in runtime_installs, "the runtime stage's venv installs adpulse"
    for req in runtime_installs:
        assert not extras(req), f"runtime installs {req}: extras are not for serving"
        assert req.lower().split("=")[0] not in dev | {"torch"}, req
    assert not any("make venv" in line for s in stages for line in s.lines), "make venv = dev"
    train = {s.name: s for s in stages}["train"]
    assert [extras(r) for r in pip_installs(train) if r.startswith(".")] == [{"train"}]


def test_dockerfile_takes_every_package_from_pypi_by_name() -> None:
    """torch==2.13.0 comes from the train extra on PyPI, not from a wheel on some disk."""
    assert pyproject()["project"]["optional-dependencies"]["train"] == ["torch==2.13.0"]
    for stage in dockerfile_stages():
        # pip's default index (PyPI), by name: no --find-links, --index-url, wheel path.
        assert set(pip_installs(stage, options=True)) <= {"--upgrade", "--no-cache-dir"}
        for req in pip_installs(stage):
            assert re.fullmatch(r"\.(\[\w+\])?|[A-Za-z0-9_.-]+([=<>!~]=?[\w.]+)?", req), req
        for line in stage.lines:
            assert not re.search(r"\.whl\b|file:|/opt/wheels|PIP_(FIND_LINKS|INDEX)", line), line
            if line.startswith("COPY ") and "--from=" not in line:
                for source in shlex.split(line)[1:-1]:
                    assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    copied = {w for s in dockerfile_stages() for line in s.lines if line.startswith("COPY ")
              for w in shlex.split(line)[1:-1]}  # fmt: skip
    packages = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {p.rstrip("*") for p in packages} | {"pyproject.toml", "README.md"}
    assert needed <= copied, f"`pip install .` needs {sorted(needed - copied)}"


def installed_closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, with what they need in turn (as the
    installed metadata says): the packages an image with only them would hold."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            todo += [Requirement(r) for r in importlib.metadata.requires(name) or ()]
    return seen


def test_code_the_runtime_image_runs_imports_without_the_dev_or_train_extras() -> None:
    """Every module but the training-only ones (model, text export) imports with the extras'
    packages blocked: what the runtime image lacks (PyTorch, pytest, ...), serving does not need."""
    project = pyproject()["project"]
    runtime = installed_closure(project["dependencies"])
    extra = project["optional-dependencies"]
    left_out = installed_closure(extra["dev"] + extra["train"]) - runtime
    modules = {
        top for top, dists in importlib.metadata.packages_distributions().items()
        if {d.lower().replace("_", "-") for d in dists} <= left_out
    }  # fmt: skip
    assert {"torch", "pytest"} <= modules
    script = f"""
import importlib, pkgutil, sys
BLOCKED = {sorted(modules)!r}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in the runtime image")
sys.meta_path.insert(0, Blocker())
failed = []
for pkg in ("schemas", "scoring", "streams", "adpulse"):
    for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            failed.append(f"{{info.name}}: {{exc}}")
print("\\n".join(failed))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # scoring.model is PyTorch's half of training (only scoring.train imports it, lazily),
    # scoring.offlinenets the models of `adpulse evaluate-offline`, and scoring.textmodel
    # the PyTorch reference of the text encoder's export (adpulse models text), and
    # scoring.attention the DIN block of both, and scoring.online and adpulse.trainer
    # `adpulse trainer` (scoring.replay its checkpointed rings), which runs where the
    # train extra is.
    assert sorted(done.stdout.split("\n")[:-1]) == [
        "adpulse.trainer: torch is not in the runtime image",
        "scoring.attention: torch is not in the runtime image",
        "scoring.model: torch is not in the runtime image",
        "scoring.offlinenets: torch is not in the runtime image",
        "scoring.online: torch is not in the runtime image",
        "scoring.replay: torch is not in the runtime image",
        "scoring.textmodel: torch is not in the runtime image",
    ], done.stdout


# -- Kubernetes ------------------------------------------------------------------------------
def all_manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            assert doc["metadata"]["name"], path.name
            docs.append(doc)
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "a kind and name twice"
    return docs


def manifests() -> dict[str, dict[str, Any]]:
    """The manifests of the kinds there is one of (ConfigMap, Service, StatefulSet)."""
    docs = all_manifests()
    kinds = [d["kind"] for d in docs]
    return {d["kind"]: d for d in docs if kinds.count(d["kind"]) == 1}


def manifest(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in all_manifests() if (d["kind"], d["metadata"]["name"]) == (kind, name)]
    return doc


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


def test_kustomize_renders_every_manifest() -> None:
    """kubectl's built-in kustomize (offline, no cluster): the kustomization builds, and
    into the same resources as the files list."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(done.stdout)}
    assert rendered == {(d["kind"], d["metadata"]["name"]) for d in all_manifests()}


@pytest.mark.parametrize(("name", "command", "port_setting"), [
    ("adpulse-trainer", "trainer", "trainer_port"),
    ("adpulse-promoter", "promoter", "promoter_port"),
])  # fmt: skip
def test_k8s_trainer_and_promoter_are_one_replica_each_on_the_workers_model_registry(
    name: str, command: str, port_setting: str
) -> None:
    """One of each per deployment, never two at once (Recreate): two trainers would learn
    the same labels, two promoters race on promotion.json. Both mount the claim the
    workers serve from, read-write, at the ConfigMap's ADPULSE_MODEL_DIR, run the train
    image's subcommand and are scraped at their metrics port."""
    config = manifests()["ConfigMap"]
    s = Settings.from_env(config["data"])
    assert s.model_dir
    dep = manifest("Deployment", name)
    assert dep["apiVersion"] == "apps/v1"
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"] == dep["spec"]["selector"]["matchLabels"]
    (container,) = pod["spec"]["containers"]
    assert container["args"][0] == command
    parsed(container["args"])
    assert "train" in container["image"], "the train stage's image (PyTorch)"
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    assert set(env) <= SETTINGS
    port = getattr(Settings.from_env({**config["data"], **env}), port_setting)
    (cport,) = container["ports"]
    assert cport["containerPort"] == port
    notes = pod["metadata"]["annotations"]
    assert (notes["prometheus.io/scrape"], notes["prometheus.io/port"]) == ("true", str(port))
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == s.model_dir]
    assert not mount.get("readOnly")
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = manifest("PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "mounted by pods on any node"
    # The workers serve from the same claim, read-only, at the same path.
    sts = manifests()["StatefulSet"]["spec"]["template"]["spec"]
    (worker,) = sts["containers"]
    (wmount,) = [m for m in worker["volumeMounts"] if m["mountPath"] == s.model_dir]
    assert wmount["readOnly"]
    (wvolume,) = [v for v in sts["volumes"] if v["name"] == wmount["name"]]
    assert wvolume["persistentVolumeClaim"]["claimName"] == claim


def test_k8s_trainer_keeps_its_checkpoint_and_writes_a_first_version_before_it_starts() -> None:
    """The checkpoint (with the consumed offsets) under DATA_DIR survives a new pod; an
    init container trains the first version (with model.pt) when the registry has none."""
    s = Settings.from_env(manifests()["ConfigMap"]["data"])
    pod = manifest("Deployment", "adpulse-trainer")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (ckpt,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(s.data_dir)]
    claim = manifest("PersistentVolumeClaim",
                     volumes[ckpt["name"]]["persistentVolumeClaim"]["claimName"])  # fmt: skip
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (init,) = pod["initContainers"]
    assert init["image"] == container["image"]
    assert init["command"] == ["sh", "-c"]
    (script,) = init["args"]
    (line,) = [ln.strip() for ln in script.splitlines() if ln.strip().startswith("adpulse ")]
    train = parsed(shlex.split(line)[1:])
    assert train.generate and train.out == s.model_dir
    assert f"{s.model_dir}/*/model.pt" in script, "only when no version with model.pt is there"
    assert any(m["mountPath"] == s.model_dir for m in init["volumeMounts"])


def test_the_test_prometheus_config_scrapes_only_the_jobs_given_targets(tmp_path: Path) -> None:
    """adpulse.prometheus.scrape_config (tests, demo): a shipped job with no process to
    scrape here is left out, since its compose host would not resolve and its up of 0
    would fire AdpulseTrainingProcessDown."""
    from adpulse.prometheus import scrape_config

    only = load_yaml(scrape_config(["http://127.0.0.1:1"], tmp_path / "a.yml"))
    assert [(j["job_name"], j["static_configs"]) for j in only["scrape_configs"]] == [
        ("adpulse", [{"targets": ["127.0.0.1:1"]}])
    ]
    both = load_yaml(scrape_config(["http://127.0.0.1:1"], tmp_path / "b.yml",
                                   others={"adpulse-trainer": ["http://127.0.0.1:2"]}))  # fmt: skip
    assert {j["job_name"]: j["static_configs"][0]["targets"] for j in both["scrape_configs"]} == {
        "adpulse": ["127.0.0.1:1"], "adpulse-trainer": ["127.0.0.1:2"]}  # fmt: skip
    with pytest.raises(ValueError, match="no scrape job"):
        scrape_config([], tmp_path / "c.yml", others={"trainer": []})
