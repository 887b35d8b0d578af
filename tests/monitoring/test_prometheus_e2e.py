"""Monitoring proven with the real thing: Debian's Prometheus scrapes a running local fleet (MQTT,
CoAP and OPC UA via `sensorfleet run`), the forecast exporter serving a real forecast report, and
the operator running against the harness control plane; the dashboard's queries and the alert
rules are evaluated by that Prometheus.

One module-scoped stack (about a minute to start on two cores), then:
  (a) `promtool check metrics` passes for every /metrics endpoint;
  (b) every dashboard panel query, variables filled in, returns data;
  (c) SensorFleetComponentDown fires when a simulator is killed and clears when it is back.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import devcluster
from devcluster import deploy
from sensorfleet.runtime import free_port, port_is_free
from sensorfleet.testing import Component, component, wait_for_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "rules.yaml"
DASHBOARD = ROOT / "monitoring" / "dashboards" / "sensorfleet.json"
FLEET = "demo"
SPARE_FLEET = "spare"  # one extra simulator outside `sensorfleet run`, killed and restarted by (c)
OPERATOR_NAMESPACE = "sf-monitoring"
FLEETS_NAMESPACE = "sf-monitoring-fleets"
RELEASE = "sensorfleet-monitoring"  # contains the chart name, so the fullname is "<release>-operator"
RATE_INTERVAL = "5m"  # $__rate_interval: Prometheus has only the test's minute of samples anyway
SENSORFLEET = [sys.executable, "-m", "sensorfleet.cli"]

pytestmark = pytest.mark.slow


def free_udp_port() -> int:
    while True:
        port = free_port(udp=True)
        if port_is_free(port):
            return port


def write_fleet(path: Path, name: str, protocols: dict[str, int]) -> Path:
    """The example fleet, small: `protocols` maps each enabled protocol to its device count."""
    doc = yaml.safe_load((ROOT / "examples" / "fleet.yaml").read_text())
    doc["metadata"]["name"] = name
    for protocol, spec in doc["spec"]["protocols"].items():
        spec["enabled"] = protocol in protocols
        if protocol in protocols:
            spec["devices"] = protocols[protocol]
    if "coap" in protocols:
        doc["spec"]["protocols"]["coap"]["port"] = free_udp_port()
    if "opcua" in protocols:
        doc["spec"]["protocols"]["opcua"]["port"] = free_port()
    doc["spec"].setdefault("broker", {})["port"] = 0  # any free port: never collide with another run
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def fast_rules(target: Path) -> Path:
    """monitoring/rules.yaml with every `for:` cut to 2 s, so alerts fire within the test."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    target.write_text(yaml.safe_dump(doc, sort_keys=False))
    return target


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)

    def stop(self, timeout: float = 45.0) -> None:
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)


def spawn(name: str, argv: list[str], logs: Path, cwd: Path | None = None) -> Process:
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    return Process(name, popen, log)


@dataclass
class Stack:
    prometheus_url: str
    endpoints: dict[str, str]  # name -> /metrics URL of every component Prometheus scrapes
    spare: Component
    report: Path  # the forecast job's metrics.json the exporter serves
    processes: list[Process] = field(default_factory=list)

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.prometheus_url}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({'running' if p.alive() else f'exited {p.popen.returncode}'}):\n{p.tail()}" for p in self.processes)


@pytest.fixture(scope="module")
def stack(k8s_cluster: devcluster.Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is not installed (apt-get install prometheus; .ci/run does)"
    work = tmp_path_factory.mktemp("monitoring-e2e")
    logs = work / "logs"
    logs.mkdir()
    fleet_file = write_fleet(work / "fleet.yaml", FLEET, {"mqtt": 5, "coap": 3, "opcua": 3})
    spare_file = write_fleet(work / "spare.yaml", SPARE_FLEET, {"coap": 2})
    processes: list[Process] = []
    spare: Component | None = None
    operator: deploy.OperatorProcess | None = None
    try:
        # A real forecast report: a generated dataset through the forecasting pipeline (in the
        # background while the rest starts).
        reports = work / "reports"
        forecast = spawn("forecast", ["bash", "-c", " && ".join([
            shlex.join([*SENSORFLEET, "generate", str(fleet_file), "--days", "2", "--interval", "60", "--devices", "2", "--protocol", "mqtt", "--data", str(work / "history"), "--quiet"]),
            shlex.join([*SENSORFLEET, "forecast", "--data", str(work / "history"), "--out", str(reports / FLEET), "--fleet", str(fleet_file), "--window-days", "2", "--cv-windows", "1", "--quiet"]),
        ])], logs)
        processes.append(forecast)

        # The fleet, as a user runs it; it writes the file_sd targets for Prometheus.
        run_logs = work / "run"
        fleet = spawn("sensorfleet-run", [*SENSORFLEET, "run", str(fleet_file), "--duration", "900", "--no-live", "--data", str(work / "data"), "--logs", str(run_logs)], logs)
        processes.append(fleet)

        # The operator: the chart installed in the harness cluster, the operator running locally
        # with the chart's ServiceAccount, one fleet applied so that it reconciles.
        k8s_cluster.kubectl("create", "namespace", FLEETS_NAMESPACE, check=False)
        deploy.install_chart(k8s_cluster, namespace=OPERATOR_NAMESPACE, release=RELEASE, extra=["--set", f"watchNamespaces={{{FLEETS_NAMESPACE}}}"])
        operator = deploy.start_operator(k8s_cluster, work / "operator", namespace=OPERATOR_NAMESPACE, service_account=f"{RELEASE}-operator", args=["--namespace", FLEETS_NAMESPACE])
        operator.wait_leading()

        # The forecast exporter, started before the report exists: it reads at every scrape.
        exporter_port = free_port()
        exporter = spawn("forecast-exporter", [*SENSORFLEET, "forecast-exporter", "--reports", str(reports), "--host", "127.0.0.1", "--port", str(exporter_port)], logs)
        processes.append(exporter)
        wait_for_port(exporter_port, timeout=30)

        # The spare simulator (its own file_sd file, as a second local fleet would have).
        spare_port = yaml.safe_load(spare_file.read_text())["spec"]["protocols"]["coap"]["port"]
        spare = component("simulate", "coap", spare_file, logs, "--host", "127.0.0.1", "--port", str(spare_port)).start()

        targets_file = run_logs / "prometheus-targets.json"
        wait_until(lambda: targets_file.exists() or not fleet.alive(), timeout=90, message="sensorfleet run to write prometheus-targets.json")
        assert fleet.alive(), f"sensorfleet run exited:\n{fleet.tail()}"
        (work / "spare-targets.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{spare.metrics_port}"], "labels": {"fleet": SPARE_FLEET, "component": "simulator", "protocol": "coap", "process": "coap-simulator-spare"}}]))

        # Prometheus, configured as docs/monitoring.md tells a user (file_sd + honor_labels).
        prometheus_port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(fast_rules(work / "rules-fast.yaml"))],
            "scrape_configs": [
                {"job_name": "sensorfleet", "honor_labels": True, "file_sd_configs": [{"files": [str(targets_file), str(work / "spare-targets.json")], "refresh_interval": "1s"}]},
                {"job_name": "sensorfleet-forecast", "honor_labels": True, "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"], "labels": {"component": "forecast-exporter"}}]},
                {"job_name": "sensorfleet-operator", "static_configs": [{"targets": [f"127.0.0.1:{operator.port}"], "labels": {"component": "operator", "namespace": OPERATOR_NAMESPACE}}]},
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        prom = spawn("prometheus", [prometheus, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"], logs)
        processes.append(prom)
        url = f"http://127.0.0.1:{prometheus_port}"

        def prometheus_ready() -> bool:
            assert prom.alive(), f"prometheus exited:\n{prom.tail()}"
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(prometheus_ready, timeout=30, message="Prometheus to be ready")
        # The example fleet for the operator, applied once Prometheus scrapes it, so that its
        # reconciles (counts and durations) happen inside the scraped window.
        manifest = yaml.safe_load((ROOT / "examples" / "fleet.yaml").read_text())
        manifest["metadata"]["namespace"] = FLEETS_NAMESPACE
        k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        endpoints = {t["labels"]["process"]: f"http://{t['targets'][0]}/metrics" for t in json.loads(targets_file.read_text())}
        endpoints["spare-coap-simulator"] = f"http://127.0.0.1:{spare.metrics_port}/metrics"
        endpoints["forecast-exporter"] = f"http://127.0.0.1:{exporter_port}/metrics"
        endpoints["operator"] = f"{operator.url}/metrics"
        assert len([n for n in endpoints if "simulator" in n]) >= 4 and len([n for n in endpoints if "collector" in n]) == 3, endpoints

        # Then a user's edit: a second reconcile, so the scraped reconcile counters and durations
        # have increased inside the window (a series first seen at 1 shows no rate yet).
        first_reconcile = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": 'sensorfleet_operator_reconcile_duration_seconds_count{kind="full"}'})
        wait_until(lambda: json.load(urllib.request.urlopen(first_reconcile, timeout=5))["data"]["result"], timeout=60, message="Prometheus to scrape the operator's first reconcile")
        k8s_cluster.kubectl("patch", "sensorfleet", FLEET, "--namespace", FLEETS_NAMESPACE, "--type", "merge", "--patch", '{"spec": {"protocols": {"mqtt": {"devices": 60}}}}')

        forecast.popen.wait(240)
        assert forecast.popen.returncode == 0, f"generate + forecast failed:\n{forecast.tail()}"
        assert (reports / FLEET / "metrics.json").is_file()
        yield Stack(url, endpoints, spare, reports / FLEET / "metrics.json", processes)
    finally:
        if spare is not None:
            spare.stop()
        for process in reversed(processes):
            process.terminate()  # `sensorfleet run` drains its fleet meanwhile: waited for below
        # Leave the cluster as we found it for the other tests of the session: the fleet deleted
        # while our operator still runs (it handles the deletion), then the operator, the release
        # and the namespaces.
        k8s_cluster.kubectl("delete", "sensorfleets", "--all", "--namespace", FLEETS_NAMESPACE, "--timeout=60s", check=False)
        if operator is not None:
            operator.stop()
        k8s_cluster.helm("uninstall", RELEASE, "--namespace", OPERATOR_NAMESPACE, "--wait", check=False)
        k8s_cluster.kubectl("delete", "namespace", FLEETS_NAMESPACE, OPERATOR_NAMESPACE, "--timeout=120s", check=False)
        for process in reversed(processes):
            process.stop()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_every_metrics_endpoint_passes_promtool_check_metrics(stack: Stack) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (apt-get install prometheus)"
    failures = []
    for name, url in stack.endpoints.items():
        text = fetch(url)
        assert "sensorfleet_" in text, f"{name} ({url}) serves no sensorfleet metrics"
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        if result.returncode != 0 or result.stdout.strip() or result.stderr.strip():
            failures.append(f"{name} ({url}): exit {result.returncode}\n{result.stdout}{result.stderr}")
    assert not failures, "\n".join(failures)


def test_prometheus_scrapes_every_target(stack: Stack) -> None:
    def all_up() -> bool:
        active = stack.api("/api/v1/targets", state="active")["activeTargets"]
        return len(active) == len(stack.endpoints) and all(t["health"] == "up" for t in active)

    try:
        wait_until(all_up, timeout=30, message="every target up")
    except AssertionError:
        active = stack.api("/api/v1/targets", state="active")["activeTargets"]
        raise AssertionError(f"targets: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in active]}\n{stack.logs()}") from None


def dashboard_queries() -> list[tuple[str, str]]:
    model = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in model["panels"] if panel["type"] != "row" for target in panel["targets"]]


def fill_variables(expr: str, namespace: str = ".*", fleet: str = FLEET) -> str:
    """What Grafana sends: $namespace = All (.*, also matching no namespace), $fleet = the fleet."""
    return expr.replace("$namespace", namespace).replace("$fleet", fleet).replace("$__rate_interval", RATE_INTERVAL)


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def test_every_dashboard_panel_query_returns_data(stack: Stack) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    stored = next(expr for title, expr in queries if "sensorfleet_readings_stored_total" in expr)
    empty: list[str] = []

    def all_have_data() -> bool:
        empty.clear()
        for title, expr in queries:
            result = stack.query(fill_variables(expr))
            if not finite(result):
                empty.append(f"{title}: {fill_variables(expr)} -> {result}")
        # and readings/s shows every protocol storing, not just a line at zero
        by_protocol = {r["metric"]["protocol"]: float(r["value"][1]) for r in stack.query(fill_variables(stored))}
        if set(by_protocol) != {"mqtt", "coap", "opcua"} or not all(v > 0 for v in by_protocol.values()):
            empty.append(f"readings stored per second by protocol: {by_protocol}")
        return not empty

    try:
        wait_until(all_have_data, timeout=90, interval=2, message="every panel query to return data")
    except AssertionError:
        raise AssertionError("panels without data:\n" + "\n".join(empty) + "\n" + stack.logs()) from None
    # The variables: the fleet variable offers the running fleet; a different fleet filters out.
    fleets = stack.api("/api/v1/label/fleet/values", **{"match[]": "sensorfleet_component_info"})
    assert FLEET in fleets and SPARE_FLEET in fleets
    assert stack.query(fill_variables(stored, fleet="no-such-fleet")) == []
    # The forecast panels show the report the pipeline wrote.
    report = json.loads(stack.report.read_text())
    mae = {r["metric"]["model"]: float(r["value"][1]) for r in stack.query(f'sensorfleet_forecast_mae{{fleet="{FLEET}"}}')}
    assert mae[report["headline"]["model"]] == pytest.approx(report["headline"]["mae"])


def test_component_down_alert_fires_when_a_simulator_is_killed_and_clears_when_it_is_back(stack: Stack) -> None:
    def firing(fleet: str) -> list[dict[str, Any]]:
        return stack.query(f'ALERTS{{alertname="SensorFleetComponentDown", alertstate="firing", fleet="{fleet}"}}')

    wait_until(lambda: stack.query(f'up{{fleet="{SPARE_FLEET}"}} == 1'), timeout=30, message="the spare simulator to be scraped")
    assert firing(SPARE_FLEET) == [] and firing(FLEET) == []

    stack.spare.process.send_signal(signal.SIGKILL)
    stack.spare.wait(10)
    wait_until(lambda: firing(SPARE_FLEET), timeout=45, message="SensorFleetComponentDown to fire for the killed simulator")
    alert = firing(SPARE_FLEET)[0]["metric"]
    assert (alert["component"], alert["protocol"], alert["severity"]) == ("simulator", "coap", "critical"), alert
    assert firing(FLEET) == [], "a component of the healthy fleet was reported down"

    stack.spare.start()  # same ports: Prometheus finds it where it was
    wait_until(lambda: not firing(SPARE_FLEET), timeout=45, message="SensorFleetComponentDown to clear once the simulator is back")
    assert stack.query(f'up{{fleet="{SPARE_FLEET}"}}')[0]["value"][1] == "1"
