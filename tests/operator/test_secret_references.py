"""Credentials reach pods only as `secretKeyRef` env from Secrets the spec references (external
broker, OPC UA username, TimeGPT key): never in a manifest's literal values, args or the ConfigMap;
and every place the app writes to is on one of the pod's emptyDirs."""

from __future__ import annotations

import json

import pytest

from sensorfleet.operator import broker_builders, builders, pod_builders
from sensorfleet.operator.child_meta import BuildOptions, Owner
from sensorfleet.spec import FleetSpecError, SensorFleet, parse_fleet

OWNER = Owner("f", "default", "uid-1")
CREDS = {"username": {"name": "plant", "key": "user"}, "password": {"name": "plant", "key": "pass"}}


def fleet(**spec: object) -> SensorFleet:
    return SensorFleet.model_validate({"metadata": {"name": "f", "namespace": "default"}, "spec": spec})


def app_containers(children: list[dict]) -> dict[str, dict]:
    out = {}
    for child in children:
        if child["kind"] in ("Deployment", "CronJob"):
            pod = child["spec"]["jobTemplate"]["spec"]["template"]["spec"] if child["kind"] == "CronJob" else child["spec"]["template"]["spec"]
            for container in pod["containers"]:
                if container["image"] == BuildOptions().image:
                    out[child["metadata"]["name"]] = {**container, "_pod": pod}
    return out


def secret_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}


def test_external_broker_credentials_are_secret_refs_of_simulators_and_collectors() -> None:
    f = fleet(broker={"mode": "external", "url": "mqtt://broker.plant:1883", "credentials": CREDS})
    children = builders.build_children(f, OWNER, BuildOptions(), None)
    containers = app_containers(children)
    for name in ("f-mqtt-simulator-0", "f-mqtt-collector-0"):
        assert secret_env(containers[name]) == {
            "SENSORFLEET_MQTT_USERNAME": {"name": "plant", "key": "user"},
            "SENSORFLEET_MQTT_PASSWORD": {"name": "plant", "key": "pass"},
        }
    assert not any(c["kind"] == "Secret" for c in children)  # the operator makes none for an external broker


def test_opcua_credentials_reach_both_ends_and_no_other_pod() -> None:
    f = fleet(protocols={"coap": {"enabled": True}, "opcua": {"enabled": True, "authentication": "username", "credentials": CREDS}})
    containers = app_containers(builders.build_children(f, OWNER, BuildOptions(), broker_builders.BrokerCredentials("u", "p")))
    for name in ("f-opcua-simulator-0", "f-opcua-collector-0"):
        assert secret_env(containers[name]) == {
            "SENSORFLEET_OPCUA_USERNAME": {"name": "plant", "key": "user"},
            "SENSORFLEET_OPCUA_PASSWORD": {"name": "plant", "key": "pass"},
        }
    for name in ("f-coap-simulator-0", "f-coap-collector-0", "f-forecast"):
        assert not set(secret_env(containers[name])) & {"SENSORFLEET_OPCUA_USERNAME", "SENSORFLEET_OPCUA_PASSWORD"}


def test_timegpt_key_is_a_secret_ref_of_the_forecast_job_only() -> None:
    f = fleet(forecasting={"model": "timegpt", "apiKey": {"name": "nixtla", "key": "api-key"}})
    containers = app_containers(builders.build_children(f, OWNER, BuildOptions(), broker_builders.BrokerCredentials("u", "p")))
    assert secret_env(containers["f-forecast"])["NIXTLA_API_KEY"] == {"name": "nixtla", "key": "api-key"}
    assert all("NIXTLA_API_KEY" not in secret_env(c) for n, c in containers.items() if n != "f-forecast")


def test_secret_names_never_carry_values_into_args_or_the_configmap() -> None:
    f = fleet(broker={"mode": "external", "url": "mqtt://b:1883", "credentials": CREDS},
              protocols={"opcua": {"enabled": True, "authentication": "username", "credentials": CREDS}},
              forecasting={"model": "timegpt", "apiKey": {"name": "nixtla", "key": "api-key"}})
    for container in app_containers(builders.build_children(f, OWNER, BuildOptions(), None)).values():
        assert not any("plant" in a or "nixtla" in a for a in container["args"])
        literal = [e for e in container["env"] if "value" in e]
        assert not any(e["name"].endswith(("PASSWORD", "USERNAME", "API_KEY")) for e in literal)


def test_every_writable_place_is_on_an_empty_dir() -> None:
    f = fleet(protocols={"coap": {"enabled": True}, "opcua": {"enabled": True, "security": "Basic256Sha256"}})
    for name, container in app_containers(builders.build_children(f, OWNER, BuildOptions(), broker_builders.BrokerCredentials("u", "p"))).items():
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        volumes = {v["name"]: v for v in container["_pod"]["volumes"]}
        writable = [m["mountPath"] for m in container["volumeMounts"]
                    if not m.get("readOnly") and ("emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]])]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        for variable in ("HOME", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "MPLCONFIGDIR", "SENSORFLEET_OPCUA_PKI"):
            assert any(env[variable] == w or env[variable].startswith(w + "/") for w in writable), (name, variable, writable)


def test_env_names_are_the_ones_the_processes_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from sensorfleet import runtime
    from sensorfleet.forecasting import errors, models
    from sensorfleet.simulators import opcua

    assert (pod_builders.ENV_MQTT_USERNAME, pod_builders.ENV_MQTT_PASSWORD) == (runtime.ENV_MQTT_USERNAME, runtime.ENV_MQTT_PASSWORD)
    assert (pod_builders.ENV_OPCUA_USERNAME, pod_builders.ENV_OPCUA_PASSWORD) == (opcua.ENV_USERNAME, opcua.ENV_PASSWORD)
    assert opcua.ENV_PKI in pod_builders.WRITABLE_ENV
    monkeypatch.delenv(pod_builders.ENV_NIXTLA_API_KEY, raising=False)
    with pytest.raises(errors.ForecastInputError):
        models.TimeGPTModel()
    monkeypatch.setenv(pod_builders.ENV_NIXTLA_API_KEY, "from-the-secret")
    assert models.TimeGPTModel().client is not None


@pytest.mark.parametrize(("spec", "message"), [
    ({"broker": {"credentials": CREDS}}, "credentials are for mode 'external' only"),
    ({"broker": {"mode": "external", "url": "mqtt://b", "credentials": {"username": {"name": "Bad_Name", "key": "u"}, "password": {"name": "p", "key": "k"}}}},
     "spec.broker.credentials.username.name"),
    ({"forecasting": {"apiKey": {"name": "nixtla"}}}, "spec.forecasting.apiKey.key: required field is missing"),
    ({"protocols": {"opcua": {"credentials": {"username": {"name": "a", "key": "b c"}, "password": {"name": "a", "key": "p"}}}}},
     "spec.protocols.opcua.credentials.username.key"),
])
def test_bad_secret_references_name_the_field(spec: dict, message: str) -> None:
    with pytest.raises(FleetSpecError) as error:
        parse_fleet({"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "f"}, "spec": spec})
    assert message in str(error.value)
