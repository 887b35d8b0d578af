"""`sensorfleet operator` and `sensorfleet crd`; `register(app)` adds them to the main CLI."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("operator")
    def operator_command(
        namespace: Annotated[Optional[list[str]], typer.Option(
            "--namespace", "-n", help="Watch only this namespace (repeatable); default: the whole cluster.")] = None,
        image: Annotated[str, typer.Option(
            envvar="SENSORFLEET_IMAGE", help="Image of simulators, collectors and the forecast job.")] = "sensorfleet:0.1.0",
        image_pull_policy: Annotated[str, typer.Option(
            envvar="SENSORFLEET_IMAGE_PULL_POLICY", help="imagePullPolicy of the fleet's pods.")] = "IfNotPresent",
        metrics_port: Annotated[int, typer.Option(help="Port of /metrics, /healthz and /readyz.")] = 8080,
        metrics_host: Annotated[str, typer.Option(help="Address the metrics endpoint binds to.")] = "0.0.0.0",
        leader_election: Annotated[bool, typer.Option(help="Hold a Lease so that only one replica acts.")] = True,
        lease_namespace: Annotated[Optional[str], typer.Option(
            help="Namespace of the Lease (default: the operator's own namespace).")] = None,
        kubeconfig: Annotated[Optional[str], typer.Option(
            envvar="KUBECONFIG", help="kubeconfig to use (default: in-cluster credentials).")] = None,
        workers: Annotated[int, typer.Option(help="Fleets reconciled concurrently.")] = 8,
        resync: Annotated[float, typer.Option(help="Seconds between full re-applies of every fleet.")] = 300.0,
        network_policy: Annotated[bool, typer.Option(
            help="Give every fleet a NetworkPolicy (its pods reachable only from each other).")] = True,
        metrics_namespace: Annotated[str, typer.Option(
            envvar="SENSORFLEET_METRICS_NAMESPACE",
            help="Namespace allowed to scrape the fleets' metrics ports (default: any namespace).")] = "",
        lease_name: Annotated[str, typer.Option(
            help="Name of the leader Lease (the chart passes its release's full name).")] = "sensorfleet-operator",
        lease_duration: Annotated[float, typer.Option(
            help="Seconds a standby waits, after the Lease last changed, before taking over.")] = 15,
        write_log: Annotated[Optional[str], typer.Option(
            help="Append one JSON line per write this replica sends to the API server (an audit log).")] = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    ) -> None:
        """Run the SensorFleet Kubernetes operator (what the operator pod runs)."""
        from sensorfleet.operator.run import OperatorConfig, run_operator

        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        if not verbose:  # kopf logs every handled watch event at INFO
            logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        namespaces = [n for item in (namespace or []) for n in item.split(",") if n.strip()]
        if not namespaces and os.environ.get("SENSORFLEET_WATCH_NAMESPACES"):
            namespaces = [n.strip() for n in os.environ["SENSORFLEET_WATCH_NAMESPACES"].split(",") if n.strip()]
        config = OperatorConfig(
            namespaces=namespaces, image=image, image_pull_policy=image_pull_policy,
            metrics_host=metrics_host, metrics_port=metrics_port, leader_election=leader_election,
            lease_namespace=lease_namespace, kubeconfig=kubeconfig, workers=workers, resync_seconds=resync,
            network_policy=network_policy, metrics_namespace=metrics_namespace,
            lease_name=lease_name, lease_duration=lease_duration, write_log=write_log,
        )
        raise typer.Exit(asyncio.run(run_operator(config)))

    @app.command("crd")
    def crd_command() -> None:
        """Print the SensorFleet CustomResourceDefinition (generated from the fleet spec)."""
        from sensorfleet.operator.crd import render_crd

        typer.echo(render_crd(), nl=False)
