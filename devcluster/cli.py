"""`python -m devcluster up|down|build|deploy|undeploy` (the Makefile's cluster-up, cluster-down,
cluster-build, deploy-local, undeploy-local)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import devcluster
from devcluster.binaries import ensure_binaries
from devcluster.cluster import Cluster, default_cluster_dir, start_cluster, stop_cluster
from devcluster.errors import ClusterError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster", description=devcluster.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "build", "deploy", "undeploy"])
    parser.add_argument("--cluster-dir", type=Path, default=None,
                        help="folder for kubeconfig, logs and state (default: $CLUSTER_DIR or .cluster)")
    args = parser.parse_args(argv)
    cluster_dir = (args.cluster_dir or default_cluster_dir()).resolve()
    try:
        if args.command in ("deploy", "undeploy"):
            from devcluster.deploy import deploy

            return deploy("up" if args.command == "deploy" else "down")
        if args.command == "build":
            ensure_binaries()
        elif args.command == "down":
            stopped = stop_cluster(cluster_dir)
            print(f"[devcluster] {'stopped the cluster in' if stopped else 'no cluster recorded in'} {cluster_dir}")
        else:
            existing = Cluster.load_state(cluster_dir)
            if existing is not None and existing.alive():
                print(f"[devcluster] already running: {existing.server}")
                cluster = existing
            else:
                binaries = ensure_binaries()
                cluster = start_cluster(cluster_dir, binaries=binaries, tie_to_parent=False)
                print(f"[devcluster] logs: {cluster_dir / 'logs'}; stop with `make cluster-down`")
            print(f"[devcluster] kubeconfig: {cluster.kubeconfig}")
            print(f"export KUBECONFIG={cluster.kubeconfig}")
    except ClusterError as error:
        print(f"[devcluster] error: {error}", file=sys.stderr)
        return 1
    return 0
