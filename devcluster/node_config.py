"""What the real node `sf-node-0` runs with (pure: paths and addresses in, configs and manifests out).

The node lives in its own network and mount namespace (see devcluster/node.py), so everything here
that looks global inside it (the pod bridge, the pod subnet, iptables chains, 127.0.0.1 ports) is
private to one node and the same for every cluster on the machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NODE_NAME = "sf-node-0"
POD_SUBNET = "10.88.0.0/24"  # inside the node's network namespace only
POD_BRIDGE = "sfbr0"
DNS_SERVICE_IP = "10.0.0.10"  # in components.SERVICE_CIDR
CLUSTER_DOMAIN = "cluster.local"
KUBELET_PORT = 10250  # inside the node's network namespace: no clash with anything on the host
STORAGE_CLASS = "standard"  # the name kind uses too, so tests need not care which cluster they run on
STORAGE_NAMESPACE = "local-path-storage"

# Placement: real pods go to the real node, everything else to kwok's fake nodes.
# Both kinds of node are tainted. The real node's taint is tolerated by no pod by itself, so pods
# of kwok-driven tests never land there; the kwok nodes' taint is tolerated by every pod outside
# the real-pod namespaces, through the cluster-wide default of the PodTolerationRestriction
# admission plugin (admission_configuration). Namespaces meant for real pods (`default`,
# `sensorfleet-system`, and any namespace made by node.real_pods_namespace) carry two annotations
# the API server's PodNodeSelector and PodTolerationRestriction plugins act on: every pod created
# there gets the node selector and the real node's toleration *instead of* the cluster default, so
# it can land on no kwok node even if its own spec named one; neither a user nor the chart adds
# anything.
REAL_NODE_LABEL = "sensorfleet.dev/node"  # = "real" on sf-node-0, "kwok" on the fake nodes
REAL_NODE_TAINT_KEY = "sensorfleet.dev/real-node"
REAL_POD_NAMESPACES = ("default", "sensorfleet-system")
NODE_SELECTOR_ANNOTATION = "scheduler.alpha.kubernetes.io/node-selector"
DEFAULT_TOLERATIONS_ANNOTATION = "scheduler.alpha.kubernetes.io/defaultTolerations"
REAL_NODE_TOLERATION = {"key": REAL_NODE_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
KWOK_NODE_TAINT_KEY = "sensorfleet.dev/kwok-node"
KWOK_NODE_TAINT = {"key": KWOK_NODE_TAINT_KEY, "value": "true", "effect": "NoSchedule"}
KWOK_NODE_TOLERATION = {"key": KWOK_NODE_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}


def admission_configuration() -> dict[str, Any]:
    """kube-apiserver's --admission-control-config-file: every pod of a namespace without its own
    defaultTolerations annotation tolerates the kwok nodes' taint (the real-pod namespaces' own
    annotation replaces this default, it does not add to it)."""
    return {
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "AdmissionConfiguration",
        "plugins": [{
            "name": "PodTolerationRestriction",
            "configuration": {
                "apiVersion": "podtolerationrestriction.admission.k8s.io/v1alpha1",
                "kind": "Configuration",
                "default": [KWOK_NODE_TOLERATION],
            },
        }],
    }


def real_pods_annotations() -> dict[str, str]:
    return {
        NODE_SELECTOR_ANNOTATION: f"{REAL_NODE_LABEL}=real",
        DEFAULT_TOLERATIONS_ANNOTATION: json.dumps([REAL_NODE_TOLERATION]),
    }


@dataclass(frozen=True)
class NodePaths:
    """Where one node keeps its state (all under one folder, removed when the node stops)."""

    root: Path

    @property
    def containerd_socket(self) -> Path:
        return self.root / "run" / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def storage(self) -> Path:
        """The local-path provisioner's volumes (plain folders, readable from the host)."""
        return self.root / "storage"


@dataclass(frozen=True)
class NodeAddresses:
    """The point-to-point link between the host and the node's network namespace."""

    host_ip: str  # host end: where the node reaches the API server (a socat relay to 127.0.0.1)
    node_ip: str  # node end: the Node's InternalIP, where the API server reaches the kubelet
    host_interface: str
    prefix: int = 30


def containerd_config(paths: NodePaths, *, runc: str, cni_bin_dir: str, sandbox_image: str) -> str:
    """containerd 2.x (config version 3) with everything under the node's folder."""
    root = paths.root / "containerd"
    return f"""\
version = 3
root = "{root / 'root'}"
state = "{root / 'state'}"
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{paths.containerd_socket}"

[ttrpc]
  address = "{paths.root / 'run' / 'containerd-ttrpc.sock'}"

[debug]
  level = "warn"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / 'opt'}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{sandbox_image}"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  netns_mounts_under_state_dir = true
  # no CAP_SYS_RESOURCE here: a container may not get a lower oom_score_adj than containerd's
  # (the sandbox asks for -998), nor raise an rlimit
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin_dir}"]
    conf_dir = "{paths.cni_conf_dir}"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def cni_conflist(paths: NodePaths) -> dict[str, Any]:
    """One bridge in the node's namespace; pods reach the host (and the API server) masqueraded."""
    return {
        "cniVersion": "1.0.0",
        "name": "sensorfleet",
        "plugins": [
            {
                "type": "bridge",
                "bridge": POD_BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.root / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(paths: NodePaths, addresses: NodeAddresses, *, pki: Path, cgroup_root: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # cgroup v1 only here, and no systemd: kubelet >= 1.35 refuses v1 unless told (KEP-5573)
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        # every pod cgroup under one subtree per node, so two clusters never share kubepods
        "cgroupRoot": cgroup_root,
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        "address": addresses.node_ip,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        # served with a certificate of the cluster CA; only the API server (a system:masters
        # client certificate) and SubjectAccessReview-authorized users get in
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(paths.root / "resolv.conf"),
        "podLogsDir": str(paths.root / "pod-logs"),
        "failSwapOn": False,
        "protectKernelDefaults": False,
        "serializeImagePulls": False,
        # never evict for disk on a shared development disk; images are imported, never pulled
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%", "imagefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "imageMinimumGCAge": "8760h",
        "registerWithTaints": [{"key": REAL_NODE_TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
        "maxPods": 110,
    }


def kube_proxy_argv(binary: Path, kubeconfig: Path) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={NODE_NAME}",
        "--proxy-mode=iptables",
        f"--cluster-cidr={POD_SUBNET}",
        # masquerade every service connection: pod -> ClusterIP -> pod on the same bridge then
        # works without br_netfilter in the node's namespace
        "--masquerade-all=true",
        # 0 = leave the kernel's conntrack settings alone (nf_conntrack_max is machine-wide)
        "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=0",
        "--conntrack-tcp-timeout-close-wait=0",
        "--metrics-bind-address=127.0.0.1:10249",
        "--healthz-bind-address=127.0.0.1:10256",
    ]


def local_path_config(paths: NodePaths) -> dict[str, Any]:
    return {"nodePathMap": [{"node": NODE_NAME, "paths": [str(paths.storage)]}]}


def local_path_helper_pod(helper_image: str) -> dict[str, Any]:
    """The pod local-path-provisioner runs on the node to make (0777) and remove a volume folder."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "helper-pod"},
        "spec": {
            "tolerations": [REAL_NODE_TOLERATION],
            "containers": [{"name": "helper-pod", "image": helper_image, "imagePullPolicy": "Never"}],
        },
    }


def storage_manifests() -> list[dict[str, Any]]:
    """The default StorageClass and what local-path-provisioner's helper pods need."""
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": STORAGE_NAMESPACE, "annotations": real_pods_annotations()}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "local-path-provisioner", "namespace": STORAGE_NAMESPACE}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "local-path-config", "namespace": STORAGE_NAMESPACE},
         "data": {
             "setup": '#!/bin/sh\nset -eu\nmkdir -m 0777 -p "$VOL_DIR"\n',
             "teardown": '#!/bin/sh\nset -eu\nrm -rf "$VOL_DIR"\n',
         }},
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
         "metadata": {"name": STORAGE_CLASS,
                      "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
         "provisioner": "rancher.io/local-path",
         # a volume is a folder on the node a pod lands on, so bind only once the pod is placed
         "volumeBindingMode": "WaitForFirstConsumer",
         "reclaimPolicy": "Delete"},
    ]


def coredns_manifests(image: str) -> list[dict[str, Any]]:
    """CoreDNS as a Deployment on the real node, behind the kube-dns Service at DNS_SERVICE_IP.

    No `forward` plugin: names outside the cluster get no answer, so nothing a pod asks leaves the
    machine.
    """
    labels = {"k8s-app": "kube-dns"}
    corefile = (
        ".:1053 {\n    errors\n    health :8080\n    ready :8181\n"
        f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n        pods insecure\n    }}\n"
        "    cache 30\n    loop\n    reload\n}\n"
    )
    rules = [
        {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"},
         "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": labels},
             "template": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "serviceAccountName": "coredns",
                     "dnsPolicy": "Default",
                     "nodeSelector": {REAL_NODE_LABEL: "real"},
                     "tolerations": [REAL_NODE_TOLERATION],
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532},
                     "containers": [{
                         "name": "coredns",
                         "image": image,
                         "imagePullPolicy": "Never",
                         "args": ["-conf", "/etc/coredns/Corefile"],  # serves :1053, no privileged port needed
                         "ports": [{"name": "dns", "containerPort": 1053, "protocol": "UDP"},
                                   {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"}],
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                         "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
                         "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                             "capabilities": {"drop": ["ALL"]}},
                         "resources": {"requests": {"cpu": "10m", "memory": "20Mi"}},
                         "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                     }],
                     "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
         "spec": {"clusterIP": DNS_SERVICE_IP, "selector": labels,
                  "ports": [{"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"}]}},
    ]


def kubernetes_endpoint_slice(host_ip: str, port: int) -> dict[str, Any]:
    """Where pods reach the API server behind the `kubernetes` Service: the relay on the host end
    of the node's link (the API server itself listens on 127.0.0.1, which a pod cannot reach)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes",
                                "endpointslice.kubernetes.io/managed-by": "sensorfleet-devcluster"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [host_ip], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }
