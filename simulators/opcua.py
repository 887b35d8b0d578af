"""OPC UA simulator: one asyncua server process serving a shard of the fleet's OPC UA devices.

Address space (see docs/protocols.md), namespace `urn:sensorfleet:<fleet>`:

    Objects/
      SensorFleet/                          FolderType
        opcua-00042/                        BaseObjectType, one per device
          temperature                       AnalogItemType, Double, source timestamp = reading time
            EngineeringUnits                EUInformation (UNECE code where known)
            EURange                         Range(min, max) from the fleet spec
          humidity, pressure, ...
          Seq                               Int64: the tick number (sequence number) of the device's
                                            latest reading, computed when read

Node ids are stable strings: `ns=<i>;s=<device>/<sensor>`, `ns=<i>;s=<device>/Seq`.

Two-way (spec.protocols.opcua.writable): `<Sensor>Setpoint` variables and the methods
`InjectFault(kind, durationSeconds)` / `Reset()` per device, see simulators/opcua_control.py.
HistoryRead of every sensor variable (historyHours > 0) from the model: simulators/opcua_history.py.

A value's StatusCode follows the signal model's quality: Good; Uncertain_LastUsableValue during a
stuck-at run; Bad_NoCommunication (value null) during a dropout -- as Microsoft's OPC PLC does.
The source timestamp is the reading's exact tick time `epoch + (seq + phase) * interval`, so a
client that knows the fleet spec recovers `seq` from it exactly (that is what the collector does:
no pairing of `Seq` and value notifications needed). `Seq` is there for humans and other clients.

Security (spec.protocols.opcua): `security: None | Basic256Sha256` (self-signed certificate
generated on first start under $SENSORFLEET_OPCUA_PKI), `authentication: anonymous | username`
(credentials from SENSORFLEET_OPCUA_USERNAME / SENSORFLEET_OPCUA_PASSWORD).
"""

from __future__ import annotations

import asyncio
import gc
import datetime as dt
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from asyncua import Server, ua
from asyncua.crypto.permission_rules import SimpleRoleRuleset, User, UserRole
from asyncua.server.user_managers import UserManager

from sensorfleet.internals import asyncua_add_nodes, asyncua_value_attribute
from sensorfleet.metrics import FleetMetrics
from sensorfleet.runtime import SimulatorOptions, stop_event_on_signals
from sensorfleet.signals import QUALITY_BAD, SignalModel, device_id, shard_devices
from sensorfleet.simulators.opcua_alarms import LimitAlarms
from sensorfleet.simulators.opcua_control import DeviceControls
from sensorfleet.simulators.opcua_history import ModelHistory

log = logging.getLogger("sensorfleet.simulators.opcua")

PROTOCOL = "opcua"
FOLDER = "SensorFleet"
SEQ_VARIABLE = "Seq"
ENV_USERNAME = "SENSORFLEET_OPCUA_USERNAME"
ENV_PASSWORD = "SENSORFLEET_OPCUA_PASSWORD"
ENV_PKI = "SENSORFLEET_OPCUA_PKI"
MAX_SLEEP = 0.05
# Readings due within one round are computed together: the signal model is vectorised, and one
# round per due device would spend most of the time in numpy call overhead. A reading is served at
# most this late (its source timestamp stays exact).
MAX_ROUND = 0.05
STATUS_GOOD = ua.StatusCode(ua.StatusCodes.Good)
STATUS_STUCK = ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)
STATUS_DROPOUT = ua.StatusCode(ua.StatusCodes.BadNoCommunication)
UNECE_UNITS_URI = "http://www.opcfoundation.org/UA/units/un/cefact"
# UNECE Recommendation 20 common codes of the units the example fleets use.
UNECE_CODES = {"degC": "CEL", "°C": "CEL", "K": "KEL", "%RH": "P1", "%": "P1", "hPa": "A97", "Pa": "PAL",
               "bar": "BAR", "ppm": "59", "lx": "LUX", "V": "VLT", "A": "AMP", "W": "WTT", "m/s": "MTS", "Hz": "HTZ"}


class SharedDataValue(ua.DataValue):
    """A DataValue the simulator never mutates after writing it, so copies can share it.

    asyncua's server deep-copies every written value once per monitored item
    (`MonitoredItemValues.set_current_datavalue`), about 50 us each -- the largest single cost of
    a value change. Encoded on the wire exactly like `ua.DataValue`."""

    def __deepcopy__(self, memo: dict) -> SharedDataValue:
        return self


def unece_unit_id(code: str) -> int:
    """OPC UA Part 8 5.6.3: the UnitId packs the UNECE common code's characters into an Int32."""
    value = 0
    for ch in code:
        value = (value << 8) | ord(ch)
    return value


def eu_information(unit: str) -> ua.EUInformation:
    code = UNECE_CODES.get(unit)
    return ua.EUInformation(
        NamespaceUri=UNECE_UNITS_URI if code else None,
        UnitId=unece_unit_id(code) if code else -1,
        DisplayName=ua.LocalizedText(unit),
        Description=ua.LocalizedText(unit),
    )


def pki_dir(fleet: str) -> Path:
    base = os.environ.get(ENV_PKI) or os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "sensorfleet", "opcua-pki")
    return Path(base) / fleet


async def ensure_certificate(directory: Path, name: str, app_uri: str, server: bool) -> tuple[Path, Path]:
    """A self-signed certificate and key under `directory`, generated on first use."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from asyncua.crypto.cert_gen import setup_self_signed_certificate

    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}-cert.der", directory / f"{name}-key.pem"
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
    await setup_self_signed_certificate(key, cert, app_uri, socket.gethostname(), usage, {"commonName": f"SensorFleet {name}", "organizationName": "SensorFleet"})
    return cert, key


class EnvUserManager(UserManager):
    """Accepts exactly the username/password from the environment (constant-time comparison)."""

    def __init__(self, username: str, password: str):
        self.username = username
        self.password = password

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None) -> User | None:
        if username is None or password is None:
            return None
        if hmac.compare_digest(username.encode(), self.username.encode()) and hmac.compare_digest(password.encode(), self.password.encode()):
            return User(role=UserRole.User)
        return None


def _attrs(kind: type, name: str, **extra: Any) -> Any:
    attrs = kind()
    attrs.DisplayName = ua.LocalizedText(name)
    for k, v in extra.items():
        setattr(attrs, k, v)
    return attrs


def _node_item(nodeid: ua.NodeId, parent: ua.NodeId, ref: int, ns: int, name: str, node_class: ua.NodeClass, type_def: int, attrs: Any) -> ua.AddNodesItem:
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = nodeid
    item.BrowseName = ua.QualifiedName(name, ns)
    item.NodeClass = node_class
    item.ParentNodeId = parent
    item.ReferenceTypeId = ua.NodeId(ref)
    item.TypeDefinition = ua.NodeId(type_def)
    item.NodeAttributes = attrs
    return item


def address_space_items(ns: int, devices: list[str], sensors: list[Any], history: bool = False) -> tuple[list[ua.AddNodesItem], ua.NodeId]:
    """AddNodes items for the whole address space, added in one call (thousands of nodes one by
    one through the high-level API take minutes). `history`: sensor variables are Historizing
    and allow HistoryRead (simulators/opcua_history.py answers it)."""
    objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
    folder = ua.NodeId(FOLDER, ns)
    read = ua.AccessLevel.CurrentRead.mask
    value_access = read | (ua.AccessLevel.HistoryRead.mask if history else 0)
    items = [_node_item(folder, objects, ua.ObjectIds.Organizes, ns, FOLDER, ua.NodeClass.Object, ua.ObjectIds.FolderType,
                        _attrs(ua.ObjectAttributes, FOLDER, Description=ua.LocalizedText("Simulated SensorFleet devices")))]
    for device in devices:
        dev = ua.NodeId(device, ns)
        items.append(_node_item(dev, folder, ua.ObjectIds.Organizes, ns, device, ua.NodeClass.Object, ua.ObjectIds.BaseObjectType, _attrs(ua.ObjectAttributes, device)))
        for sensor in sensors:
            var = ua.NodeId(f"{device}/{sensor.name}", ns)
            items.append(_node_item(var, dev, ua.ObjectIds.HasComponent, ns, sensor.name, ua.NodeClass.Variable, ua.ObjectIds.AnalogItemType,
                                    _attrs(ua.VariableAttributes, sensor.name, Value=ua.Variant(0.0, ua.VariantType.Double), Historizing=history,
                                           DataType=ua.NodeId(ua.ObjectIds.Double), ValueRank=-1, AccessLevel=value_access, UserAccessLevel=value_access,
                                           Description=ua.LocalizedText(f"{sensor.name} in {sensor.unit}"))))
            for prop, value, vtype, dtype in (
                ("EngineeringUnits", eu_information(sensor.unit), ua.VariantType.ExtensionObject, ua.ObjectIds.EUInformation),
                ("EURange", ua.Range(Low=float(sensor.min), High=float(sensor.max)), ua.VariantType.ExtensionObject, ua.ObjectIds.Range),
            ):
                items.append(_node_item(ua.NodeId(f"{device}/{sensor.name}/{prop}", ns), var, ua.ObjectIds.HasProperty, 0, prop, ua.NodeClass.Variable, ua.ObjectIds.PropertyType,
                                        _attrs(ua.VariableAttributes, prop, Value=ua.Variant(value, vtype), DataType=ua.NodeId(dtype), ValueRank=-1, AccessLevel=read, UserAccessLevel=read)))
        items.append(_node_item(ua.NodeId(f"{device}/{SEQ_VARIABLE}", ns), dev, ua.ObjectIds.HasComponent, ns, SEQ_VARIABLE, ua.NodeClass.Variable, ua.ObjectIds.BaseDataVariableType,
                                _attrs(ua.VariableAttributes, SEQ_VARIABLE, Value=ua.Variant(0, ua.VariantType.Int64), DataType=ua.NodeId(ua.ObjectIds.Int64), ValueRank=-1,
                                       AccessLevel=read, UserAccessLevel=read, Description=ua.LocalizedText("Tick number of the device's latest reading since the fleet epoch"))))
    return items, folder


async def build_server(fleet_name: str, cfg: Any, host: str, port: int) -> tuple[Server, int]:
    """An asyncua server configured from `spec.protocols.opcua` (security, authentication)."""
    user_manager = None
    if cfg.authentication == "username":
        username, password = os.environ.get(ENV_USERNAME), os.environ.get(ENV_PASSWORD)
        if not username or not password:
            raise ValueError(f"spec.protocols.opcua.authentication is 'username' but {ENV_USERNAME} / {ENV_PASSWORD} are not set (in Kubernetes: set spec.protocols.opcua.credentials)")
        user_manager = EnvUserManager(username, password)
    server = Server(user_manager=user_manager)
    await server.init()
    server.set_endpoint(f"opc.tcp://{host}:{port}/")
    server.set_server_name(f"SensorFleet {fleet_name}")
    app_uri = f"urn:sensorfleet:{fleet_name}:opcua-simulator"
    await server.set_application_uri(app_uri)
    if cfg.security == "Basic256Sha256":
        cert, key = await ensure_certificate(pki_dir(fleet_name), "server", app_uri, server=True)
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt, ua.SecurityPolicyType.Basic256Sha256_Sign], permission_ruleset=SimpleRoleRuleset())
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    server.set_identity_tokens([ua.UserNameIdentityToken] if cfg.authentication == "username" else [ua.AnonymousIdentityToken])
    ns = await server.register_namespace(f"urn:sensorfleet:{fleet_name}")
    return server, ns


class OpcuaSimulator:
    def __init__(self, opts: SimulatorOptions):
        fleet = opts.fleet
        self.cfg = fleet.spec.protocols.opcua
        self.fleet_name = fleet.name
        self.model = SignalModel(fleet.spec, fleet.name, PROTOCOL)
        self.metrics = FleetMetrics(fleet.name, PROTOCOL, "simulator")
        self.host = opts.host
        self.port = opts.port if opts.port is not None else self.cfg.port
        shard = shard_devices(self.cfg.devices, self.cfg.replicas, opts.replica)
        self.indices = np.arange(shard.start, shard.stop, dtype=np.int64)
        self.devices = [device_id(PROTOCOL, int(i)) for i in self.indices]
        self.phase = self.model.phase(self.indices)
        self.last_tick = np.full(len(self.indices), -1, dtype=np.int64)
        self.min_round = min(MAX_ROUND, self.model.interval / 5)
        self.totals = {"published": 0, "dropped": 0}
        self.server: Server | None = None
        self.controls: DeviceControls | None = None  # spec.protocols.opcua.writable
        self.alarms: LimitAlarms | None = None  # spec.protocols.opcua.limitAlarms

    def due_ticks(self, now: float) -> np.ndarray:
        return np.floor((now - self.model.epoch) / self.model.interval - self.phase).astype(np.int64)

    async def update(self) -> None:
        """Write every device's reading that became current since the last round."""
        assert self.server is not None
        now = time.time()
        ticks = self.due_ticks(now)
        changed = np.nonzero(ticks > self.last_tick)[0]
        if not len(changed):
            return
        n_sensors = len(self.model.sensors)
        started = self.last_tick[changed] >= 0
        skipped = int(np.sum((ticks[changed] - self.last_tick[changed] - 1)[started])) * n_sensors
        if skipped:  # behind schedule: jump to the current tick, never queue
            self.metrics.dropped("overload").inc(skipped)
            self.totals["dropped"] += skipped
        self.last_tick[changed] = ticks[changed]
        block = self.model.block(self.indices[changed], ticks[changed], self.controls.log if self.controls else None)
        self.metrics.schedule_lag.set(max(0.0, now - float(block.times.min()) - self.model.interval))
        server_ts = dt.datetime.now(dt.timezone.utc)
        values, quality, times = block.values.tolist(), block.quality.tolist(), block.times.tolist()
        double, null = ua.VariantType.Double, ua.VariantType.Null
        for j, row in enumerate(changed.tolist()):
            source_ts = _utc(times[j])
            for s, attribute in enumerate(self.value_attributes[row]):
                q = quality[j][s]
                if q == QUALITY_BAD:
                    value = SharedDataValue(ua.Variant(None, null), StatusCode=STATUS_DROPOUT, SourceTimestamp=source_ts, ServerTimestamp=server_ts)
                else:
                    value = SharedDataValue(ua.Variant(values[j][s], double), StatusCode=STATUS_GOOD if q == 0 else STATUS_STUCK, SourceTimestamp=source_ts, ServerTimestamp=server_ts)
                # What AddressSpace.write_attribute_value does, minus its per-call lookups and type
                # checks (the types are ours): store, then notify the monitored items.
                attribute.value = value
                attribute.value_callback = None
                for handle, callback in attribute.datachange_callbacks.items():
                    await callback(handle, value)
            if j % 200 == 199:
                await asyncio.sleep(0)  # let publish requests through during a large round
        if self.alarms:
            await self.alarms.check(changed, block.values, [_utc(t) for t in times])
        n = len(changed) * n_sensors
        self.metrics.published.inc(n)
        self.metrics.last_activity.set(time.time())
        self.totals["published"] += n

    def _seq_reader(self, row: int) -> Any:
        def read_seq(_nodeid: ua.NodeId, _attr: ua.AttributeIds) -> ua.DataValue:
            tick = int(self.last_tick[row])
            source_ts = _utc(self.model.epoch + (tick + float(self.phase[row])) * self.model.interval)
            return ua.DataValue(ua.Variant(tick, ua.VariantType.Int64), SourceTimestamp=source_ts, ServerTimestamp=dt.datetime.now(dt.timezone.utc))

        return read_seq

    def next_due(self) -> float:
        return float(self.model.epoch + ((self.last_tick + 1 + self.phase) * self.model.interval).min())

    async def run(self, stop: threading.Event, duration: float | None) -> None:
        self.server, ns = await build_server(self.fleet_name, self.cfg, self.host, self.port)
        started = time.perf_counter()
        history = self.cfg.history_hours > 0
        items, _ = address_space_items(ns, self.devices, self.model.sensors, history)
        if self.cfg.writable:
            self.controls = DeviceControls(self.model, self.cfg, ns, self.devices, self.indices)
            items += self.controls.items(_node_item, _attrs)
        results = await asyncua_add_nodes(self.server, items)
        bad = [r.StatusCode for r in results if not r.StatusCode.is_good()]
        if bad:
            raise RuntimeError(f"building the address space failed for {len(bad)} nodes, first: {bad[0]}")
        names = [s.name for s in self.model.sensors]
        aspace = self.server.iserver.aspace
        self.value_attributes = [[asyncua_value_attribute(self.server, ua.NodeId(f"{d}/{name}", ns)) for name in names] for d in self.devices]
        # Seq is computed when read (exact, and costs nothing per tick), not written every tick.
        for row, device in enumerate(self.devices):
            aspace.set_attribute_value_callback(ua.NodeId(f"{device}/{SEQ_VARIABLE}", ns), ua.AttributeIds.Value, self._seq_reader(row))
        if self.controls:
            await self.controls.install(self.server)
        if self.cfg.limit_alarms:
            self.alarms = LimitAlarms(self.model, self.cfg, ns, self.devices)
            await self.alarms.install(self.server)
        if history:
            variables = {ua.NodeId(f"{d}/{name}", ns): (row, s) for row, d in enumerate(self.devices) for s, name in enumerate(names)}
            self.server.iserver.history_manager.set_storage(
                ModelHistory(self.model, variables, self.indices, self.phase, lambda row: int(self.last_tick[row]),
                             lambda: self.controls.log if self.controls else None, self.cfg.history_hours))
        log.info("address space: %d nodes in %.1f s", len(items), time.perf_counter() - started)
        # The address space lives as long as the process: keep the cyclic GC from walking its
        # hundreds of thousands of objects again and again (a full pass stalls the loop for
        # long enough to skip ticks).
        gc.freeze()
        await self.update()
        async with self.server:
            log.info("OPC UA simulator of fleet %s: %d devices x %d sensors on opc.tcp://%s:%d/ (security %s, %s)",
                     self.fleet_name, len(self.devices), len(names), self.host, self.port, self.cfg.security, self.cfg.authentication)
            self.metrics.devices.set(len(self.devices))
            self.metrics.connected.set(1)
            deadline = time.monotonic() + duration if duration else math.inf
            while not stop.is_set() and time.monotonic() < deadline:
                await self.update()
                await asyncio.sleep(min(MAX_SLEEP, max(self.min_round, self.next_due() - time.time())))
            # Drain: subscribers get the last values with their next publish before the server goes.
            await asyncio.sleep(min(5.0, 2 * self.cfg.publishing_interval + 0.2))
            self.metrics.connected.set(0)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _utc(ts: float) -> dt.datetime:
    return _EPOCH + dt.timedelta(seconds=ts)


def run(opts: SimulatorOptions) -> int:
    """Serve the OPC UA devices of shard `opts.replica` until SIGINT/SIGTERM or `opts.duration`."""
    stop = stop_event_on_signals()
    # asyncua logs whole requests at INFO; at thousands of values per second that costs a core.
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    try:
        sim = OpcuaSimulator(opts)
        sim.metrics.serve(opts.metrics_port, opts.metrics_host, opts.metrics_port_file)
        asyncio.run(sim.run(stop, opts.duration))
    except (OSError, ValueError) as exc:
        log.error("OPC UA simulator cannot start: %s", exc)
        return 1 if isinstance(exc, OSError) else 2
    # last_tick_sum: sum over devices of the last tick served; lets a test check the tail exactly.
    log.info("SUMMARY %s", json.dumps({"component": "simulator", "protocol": PROTOCOL, **sim.totals, "devices": len(sim.indices), "last_tick_sum": int(sim.last_tick.sum())}))
    return 0
