"""Operator benchmark on the local control plane (issue 6).

    python bench/bench_operator.py          (make bench-operator)

1. apply -> every child created: p50/p95 over 20 fleets applied one after another;
2. 100 fleets applied at once -> all Ready (pods Running on kwok nodes);
3. the operator's peak RSS over the whole run.
Targets: p50 < 1 s, 100 fleets < 60 s, RSS < 200 MiB. Results: bench/results/operator.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

import devcluster
from devcluster import deploy
from sensorfleet.operator import broker_builders, builders, child_meta
from sensorfleet.spec import SensorFleet

RESULTS = Path(__file__).resolve().parent / "results" / "operator.json"
NAMESPACE = "bench"
TARGETS = {"p50_s": 1.0, "hundred_ready_s": 60.0, "peak_rss_mib": 200.0}


def fleet_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet",
        "metadata": {"name": name, "namespace": NAMESPACE},
        # broker + MQTT simulator + collector: 3 pods a fleet, so 100 fleets fit on the harness's
        # 3 kwok nodes (110 pods each).
        "spec": {"protocols": {"mqtt": {"devices": 20}},
                 "storage": {"url": f"memory://{name}"}},
    }


def expected_children(name: str) -> int:
    fleet = SensorFleet.model_validate(fleet_manifest(name))
    return len(builders.build_children(fleet, child_meta.Owner(name, NAMESPACE, "x"), child_meta.BuildOptions(),
                                       broker_builders.BrokerCredentials("u", "p")))


def count_children(api: Any, name: str) -> int:
    from kubernetes import client

    core, apps, batch = client.CoreV1Api(api), client.AppsV1Api(api), client.BatchV1Api(api)
    selector = f"sensorfleet.io/fleet={name}"
    return sum(len(x.items) for x in (
        apps.list_namespaced_deployment(NAMESPACE, label_selector=selector),
        core.list_namespaced_service(NAMESPACE, label_selector=selector),
        core.list_namespaced_config_map(NAMESPACE, label_selector=selector),
        core.list_namespaced_secret(NAMESPACE, label_selector=selector),
        batch.list_namespaced_cron_job(NAMESPACE, label_selector=selector),
    ))


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    console = Console()
    from kubernetes import client

    load_at_start = [round(x, 2) for x in psutil.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="sf-bench-") as tmp, devcluster.running_cluster(Path(tmp) / "cluster") as cluster:
        deploy.install_chart(cluster)
        operator = deploy.start_operator(cluster, Path(tmp) / "operator", args=["--workers", "16"])
        sampler = RssSampler(operator.pid)
        sampler.start()
        try:
            operator.wait_leading()
            api = cluster.api_client()
            custom = client.CustomObjectsApi(api)
            client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
            want = expected_children("seq-00")
            latencies: list[float] = []
            for i in range(20):
                name = f"seq-{i:02d}"
                started = time.perf_counter()
                custom.create_namespaced_custom_object("sensorfleet.io", "v1alpha1", NAMESPACE, "sensorfleets", fleet_manifest(name))
                while count_children(api, name) < want:
                    if time.perf_counter() - started > 60:
                        raise TimeoutError(f"{name}: children not created within 60 s")
                    time.sleep(0.02)
                latencies.append(time.perf_counter() - started)
            console.print(f"20 fleets: children created p50 {statistics.median(latencies):.3f}s")

            # make room on the kwok nodes: remove the 20 fleets (garbage collection takes their pods)
            for i in range(20):
                custom.delete_namespaced_custom_object("sensorfleet.io", "v1alpha1", NAMESPACE, "sensorfleets", f"seq-{i:02d}")
            deadline = time.perf_counter() + 120
            while client.CoreV1Api(api).list_namespaced_pod(NAMESPACE).items and time.perf_counter() < deadline:
                time.sleep(0.5)

            names = [f"burst-{i:03d}" for i in range(100)]
            started = time.perf_counter()
            cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(fleet_manifest(n)) for n in names))
            applied = time.perf_counter() - started
            while True:
                items = custom.list_namespaced_custom_object("sensorfleet.io", "v1alpha1", NAMESPACE, "sensorfleets")["items"]
                ready = sum(1 for f in items if f["metadata"]["name"].startswith("burst-") and any(
                    c["type"] == "Ready" and c["status"] == "True" for c in f.get("status", {}).get("conditions", [])))
                if ready == len(names):
                    break
                if time.perf_counter() - started > 180:
                    console.print(f"[red]only {ready}/100 fleets Ready after 180 s[/red]")
                    break
                time.sleep(0.25)
            hundred = time.perf_counter() - started
            hundred_ready = ready
            nodes_not_ready = sum(1 for n in client.CoreV1Api(api).list_node().items if not any(
                c.type == "Ready" and c.status == "True" for c in n.status.conditions or []))
            pods = client.CoreV1Api(api).list_namespaced_pod(NAMESPACE).items
            running = sum(1 for p in pods if p.status.phase == "Running")
            # "Running" is not "Ready": the node lifecycle controller sets Ready=False on every pod of
            # a Node it declares NotReady (kwok without node Leases: heartbeats go stale).
            pods_ready = sum(1 for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []))
            node_not_ready_events = sum(e.count or 1 for e in client.CoreV1Api(api).list_event_for_all_namespaces().items
                                        if e.reason == "NodeNotReady")
            metrics_text = operator.get("/metrics")[1]
        finally:
            sampler.running = False
            operator.stop()

    peak_mib = sampler.peak / 2**20
    result = {
        "fleets_sequential": 20,
        "children_per_fleet": want,
        "children_created_p50_s": round(statistics.median(latencies), 4),
        "children_created_p95_s": round(percentile(latencies, 0.95), 4),
        "children_created_max_s": round(max(latencies), 4),
        "hundred_fleets_apply_s": round(applied, 3),
        "hundred_fleets_all_ready_s": round(hundred, 3) if hundred_ready == 100 else None,
        "hundred_fleets_ready": hundred_ready,
        "kwok_nodes_not_ready_at_end": nodes_not_ready,
        "node_not_ready_events": node_not_ready_events,
        "load_average_at_start": load_at_start,
        "load_average": [round(x, 2) for x in psutil.getloadavg()],
        "pods_running": running,
        "pods_ready": pods_ready,
        "operator_peak_rss_mib": round(peak_mib, 1),
        "reconcile_errors": sum(float(line.split()[-1]) for line in metrics_text.splitlines()
                                if line.startswith("sensorfleet_operator_reconcile_errors_total{")),
        "targets": TARGETS,
        "machine": {"cpus": psutil.cpu_count(), "python": sys.version.split()[0]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title="SensorFleet operator on the local control plane")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("apply → all children created, p50", f"{result['children_created_p50_s']:.3f} s", "< 1 s")
    table.add_row("apply → all children created, p95", f"{result['children_created_p95_s']:.3f} s", "")
    table.add_row("100 fleets at once → all Ready", f"{hundred:.1f} s ({hundred_ready}/100 Ready)", "< 60 s")
    table.add_row("pods Running / Ready (kwok)", f"{running} / {pods_ready}", "")
    table.add_row("NodeNotReady events", str(node_not_ready_events), "0")
    table.add_row("load average (1 min) start → end", f"{load_at_start[0]:.1f} → {result['load_average'][0]:.1f}", "")
    table.add_row("operator peak RSS", f"{peak_mib:.0f} MiB", "< 200 MiB")
    table.add_row("reconcile errors", f"{result['reconcile_errors']:.0f}", "0")
    console.print(table)
    console.print(f"results: {RESULTS}")
    ok = (result["children_created_p50_s"] < TARGETS["p50_s"] and hundred_ready == 100 and hundred < TARGETS["hundred_ready_s"]
          and peak_mib < TARGETS["peak_rss_mib"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
