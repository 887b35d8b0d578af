"""How many pods a fleet runs and how big each one is: collector counts, and requests/limits
that grow with the devices a pod serves, written in the API server's canonical quantities.
"""

from __future__ import annotations

import math

from sensorfleet.spec import SensorFleet

# Requests/limits per role: the floor of every pod, small enough for kind on a laptop. Simulators
# and collectors grow from there with the devices they serve (see pod_resources).
RESOURCES: dict[str, dict[str, dict[str, str]]] = {
    "simulator": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"cpu": "1", "memory": "384Mi"}},
    "collector": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "768Mi"}},
    "broker": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
    "forecast": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
    "init": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
}

# Costs per unit of work a pod does, rounded up from docs/protocols.md and the bench figures: one
# core carries ~10,000 QoS 1 messages/s through paho, a collector validates and writes ~5,000
# readings/s per core; a device's state (address-space node, tracker entry, queue) costs KiBs.
SIMULATOR_MILLICORES_PER_READING_S = 0.1
COLLECTOR_MILLICORES_PER_READING_S = 0.2
SIMULATOR_MIB_PER_DEVICE = 0.02
COLLECTOR_MIB_PER_SERIES = 0.002
COLLECTOR_MIB_PER_BATCH_ROW = 0.001
MQTT_QUEUED_MESSAGE_MIB = 0.0003  # a simulator's publish queue holds up to maxQueued messages

# connectionPerDevice (simulators/mqtt_devices.py): what one device connection costs, measured by
# bench/bench_connections.py (RSS growth over 10,000 connections, rounded up).
SIMULATOR_MIB_PER_CONNECTION = 0.02


def collector_count(fleet: SensorFleet, protocol: str) -> int:
    """Collector pods of a protocol. CoAP/OPC UA collectors split the simulator servers between
    them, so there are never more collectors than servers; MQTT collectors share a subscription."""
    spec = fleet.spec.protocol(protocol)
    if protocol == "mqtt":
        return spec.collector_replicas
    return min(spec.collector_replicas, spec.replicas)


def desired_pods(fleet: SensorFleet) -> dict[str, dict[str, int]]:
    """Per enabled protocol: how many simulator and collector pods the fleet should run."""
    return {
        p: {"simulators": fleet.spec.protocol(p).replicas, "collectors": collector_count(fleet, p)}
        for p in fleet.spec.enabled_protocols()
    }


def pod_resources(fleet: SensorFleet, role: str, protocol: str | None = None) -> dict[str, dict[str, str]]:
    """Requests/limits of one pod: the role's floor (RESOURCES), grown with the devices per replica
    of simulators and collectors, so a 10,000-device fleet is not squeezed into a laptop's pod."""
    if protocol is None or role not in ("simulator", "collector"):
        return RESOURCES[role]
    spec = fleet.spec.protocol(protocol)
    pods = spec.replicas if role == "simulator" else collector_count(fleet, protocol)
    devices = math.ceil(spec.devices / pods)
    series = devices * len(fleet.spec.sensors)
    readings_per_second = series / spec.interval
    if role == "simulator":
        cpu = 20 + readings_per_second * SIMULATOR_MILLICORES_PER_READING_S
        memory = 64 + devices * SIMULATOR_MIB_PER_DEVICE
        queue = fleet.spec.protocols.mqtt.max_queued * MQTT_QUEUED_MESSAGE_MIB if protocol == "mqtt" else 0
        if protocol == "mqtt" and fleet.spec.protocols.mqtt.connection_per_device:
            memory += devices * SIMULATOR_MIB_PER_CONNECTION
    else:
        cpu = 20 + readings_per_second * COLLECTOR_MILLICORES_PER_READING_S
        memory = 96 + series * COLLECTOR_MIB_PER_SERIES + fleet.spec.collector.batch_size * COLLECTOR_MIB_PER_BATCH_ROW
        # While the store fails a collector holds up to maxBufferedReadings (collectors/backpressure.py).
        queue = fleet.spec.storage.max_buffered_readings * COLLECTOR_MIB_PER_BATCH_ROW
    floor = RESOURCES[role]
    cpu_request = min(max(cpu, parse_millicores(floor["requests"]["cpu"])), 4000)
    memory_request = min(max(memory, parse_mebibytes(floor["requests"]["memory"])), 16384)
    return {
        "requests": {"cpu": cpu_quantity(cpu_request), "memory": memory_quantity(memory_request)},
        "limits": {"cpu": cpu_quantity(max(2 * cpu_request, parse_millicores(floor["limits"]["cpu"]))),
                   "memory": memory_quantity(max(3 * memory_request + queue, parse_mebibytes(floor["limits"]["memory"])))},
    }


def cpu_quantity(millis: float) -> str:
    """In the API server's canonical form (whole cores as "2"), so an apply changes nothing."""
    m = math.ceil(millis)
    return str(m // 1000) if m % 1000 == 0 else f"{m}m"


def memory_quantity(mebibytes: float) -> str:
    mi = math.ceil(mebibytes)
    return f"{mi // 1024}Gi" if mi % 1024 == 0 else f"{mi}Mi"


def parse_millicores(quantity: str) -> float:
    return float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000


def parse_mebibytes(quantity: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0, "Ki": 1 / 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]
