"""What each control-plane component is started with (pure: paths and ports in, argv out), and the
fake Nodes kwok plays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from devcluster.binaries import KWOK_STAGES_FILE
from devcluster.node_config import KWOK_NODE_TAINT, REAL_NODE_LABEL

NODE_COUNT = 3
ADMISSION_CONFIG_FILE = "admission.json"  # in the cluster's state folder: node_config.admission_configuration()
NODE_ANNOTATION = "kwok.x-k8s.io/node"  # kwok manages only Nodes carrying this annotation = "fake"
SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
PORT_NAMES = ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def kwok_node_manifest(name: str) -> dict[str, Any]:
    """A fake Node for kwok, tainted: only pods outside the real-pod namespaces tolerate it (by the
    API server's default toleration, node_config.admission_configuration)."""
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                REAL_NODE_LABEL: "kwok",
            },
        },
        "spec": {"taints": [KWOK_NODE_TAINT]},
        "status": {"allocatable": resources, "capacity": resources},
    }


def component_argv(binaries: Path, state_dir: Path, pki: Path, ports: dict[str, int]) -> dict[str, list[str]]:
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"

    def delegated(name: str) -> list[str]:
        kubeconfig = str(pki / f"{name}.kubeconfig")
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports[name]}",
            f"--cert-dir={state_dir / name}",
            "--leader-elect=false",
        ]

    return {
        "etcd": [
            str(binaries / "etcd"),
            "--name=default",
            f"--data-dir={state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync",  # throwaway data: no fsync keeps a 2-core machine responsive
            "--log-level=warn",
        ],
        "kube-apiserver": [
            str(binaries / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['kube-apiserver']}",
            f"--cert-dir={state_dir / 'kube-apiserver'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            # Node: the real node's kubelet (system:node:sf-node-0) gets what its pods need, no more
            "--authorization-mode=Node,RBAC",
            # act only on namespaces annotated for them: the real node's placement defaults
            # (devcluster/node_config.py); no effect anywhere else
            "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction",
            # the cluster-wide default toleration of the kwok nodes' taint (written by cluster.py)
            f"--admission-control-config-file={state_dir / ADMISSION_CONFIG_FILE}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            # 127.0.0.1 may not be an Endpoints address; nothing in-cluster dials the apiserver here.
            "--endpoint-reconciler-type=none",
        ],
        "kube-controller-manager": [
            str(binaries / "kube-controller-manager"),
            *delegated("kube-controller-manager"),
            # The default client rate (20 QPS, burst 30) makes ReplicaSets and Pods of a burst of
            # Deployments trail by tens of seconds (100 fleets: 71 s to Ready instead of 24 s).
            "--kube-api-qps=100",
            "--kube-api-burst=200",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--cluster-name=sensorfleet-dev",
        ],
        "kube-scheduler": [
            str(binaries / "kube-scheduler"),
            *delegated("kube-scheduler"),
        ],
        "kwok": [
            str(binaries / "kwok"),
            f"--kubeconfig={pki / 'kwok.kubeconfig'}",
            f"--config={KWOK_STAGES_FILE}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION}=fake",
            f"--cidr={POD_CIDR}",
            "--node-ip=10.240.0.1",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            f"--node-port={ports['kwok']}",
            # Keep the Nodes' Leases: the heartbeat stage updates Node status only every 10-20 min,
            # so without Leases the node lifecycle controller sets every Node NotReady after its
            # grace period and every pod on it Ready=False (kwok never readies them again).
            "--node-lease-duration-seconds=40",
        ],
    }

