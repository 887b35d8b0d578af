"""What the operator builds for the dataset (pure builders, no API server): claim access modes
and retention, one node for ReadWriteOnce users, S3 endpoint and keys as env (keys from Secrets
only), the compaction CronJob; bad storage fields are refused naming the field."""

from __future__ import annotations

import json

import pytest

from sensorfleet.operator import broker_builders, builders, child_meta, storage_builders
from sensorfleet.spec import FleetSpecError, parse_fleet

OWNER = child_meta.Owner("plant", "factory", "uid-1")
CREDS = broker_builders.BrokerCredentials("sensorfleet", "pw")


def children(storage: dict) -> dict[tuple[str, str], dict]:
    fleet = builders.fleet_from_body({"metadata": {"name": "plant", "namespace": "factory"},
                                      "spec": {"storage": storage, "protocols": {"coap": {"enabled": True}}}})
    return {(c["kind"], c["metadata"]["name"]): c for c in builders.build_children(fleet, OWNER, child_meta.BuildOptions(), CREDS)}


def pod_templates(kids: dict) -> dict[str, dict]:
    out = {}
    for (kind, name), child in kids.items():
        if kind == "Deployment":
            out[name] = child["spec"]["template"]
        elif kind == "CronJob":
            out[name] = child["spec"]["jobTemplate"]["spec"]["template"]
    return out


def mounts_claim(template: dict) -> bool:
    return any("persistentVolumeClaim" in v for v in template["spec"]["volumes"])


def test_readwriteonce_users_are_pinned_to_one_node_and_readwritemany_users_are_not() -> None:
    rwo = pod_templates(children({}))
    users = {n: t for n, t in rwo.items() if mounts_claim(t)}
    assert set(users) == {"plant-mqtt-collector-0", "plant-coap-collector-0", "plant-forecast", "plant-compact"}
    for name, template in users.items():
        assert template["metadata"]["labels"][child_meta.DATA_CLAIM_LABEL] == "plant-data", name
        term = template["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term == {"labelSelector": {"matchLabels": {child_meta.DATA_CLAIM_LABEL: "plant-data"}}, "topologyKey": "kubernetes.io/hostname"}
    assert not any("affinity" in t["spec"] for n, t in rwo.items() if n not in users)
    rwx = children({"accessModes": ["ReadWriteMany"]})
    assert rwx[("PersistentVolumeClaim", "plant-data")]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not any("affinity" in t["spec"] for t in pod_templates(rwx).values())


def test_the_claim_is_kept_by_default_and_owned_only_on_request() -> None:
    kept = children({})[("PersistentVolumeClaim", "plant-data")]
    assert "ownerReferences" not in kept["metadata"]
    assert kept["metadata"]["labels"][child_meta.CLAIM_RETENTION_LABEL] == "Retain"
    owned = children({"claimRetention": {"whenDeleted": "Delete"}})[("PersistentVolumeClaim", "plant-data")]
    assert owned["metadata"]["ownerReferences"] == [child_meta.owner_reference(OWNER)]


def test_s3_storage_reaches_every_reader_and_writer_as_env_with_keys_from_the_secret() -> None:
    kids = children({"url": "s3://lake/plant", "endpoint": "http://seaweedfs.storage:8333", "region": "eu-west-1",
                     "credentials": {"accessKeyId": {"name": "lake-keys", "key": "id"},
                                     "secretAccessKey": {"name": "lake-keys", "key": "secret"}}})
    assert ("PersistentVolumeClaim", "plant-data") not in kids
    templates = pod_templates(kids)
    data_pods = [n for n in templates if "collector" in n or n in ("plant-forecast", "plant-compact")]
    assert len(data_pods) == 4
    for name in data_pods:
        container = templates[name]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://seaweedfs.storage:8333", name
        assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "lake-keys", "key": "id"}}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "lake-keys", "key": "secret"}}
        assert "s3://lake/plant" in container["args"] and "affinity" not in templates[name]["spec"]
    simulators = [t for n, t in templates.items() if "simulator" in n]
    assert simulators and not any(e["name"].startswith("AWS_") for t in simulators for e in t["spec"]["containers"][0]["env"])
    assert "lake-keys" in json.dumps(list(kids.values()))  # only the name of the Secret, never a key value


def test_compaction_cronjob_runs_compact_with_the_retention() -> None:
    job = children({"retentionDays": 30, "compactionSchedule": "5 * * * *"})[("CronJob", "plant-compact")]
    assert job["spec"]["schedule"] == "5 * * * *" and job["spec"]["concurrencyPolicy"] == "Forbid"
    container = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["compact", "--data", storage_builders.DATA_DIR, "--retention-days", "30"]


@pytest.mark.parametrize("storage, field", [
    ({"endpoint": "http://x:1"}, "spec.storage"),
    ({"url": "s3://b/p", "endpoint": "ftp://x"}, "spec.storage.endpoint"),
    ({"accessModes": ["ReadOnlyMany"]}, "spec.storage.accessModes"),
    ({"claimRetention": {"whenDeleted": "Later"}}, "spec.storage.claimRetention.whenDeleted"),
    ({"retentionDays": 0}, "spec.storage.retentionDays"),
    ({"compactionSchedule": "hourly"}, "spec.storage.compactionSchedule"),
])
def test_bad_storage_fields_are_refused_naming_the_field(storage: dict, field: str) -> None:
    with pytest.raises(FleetSpecError) as error:
        parse_fleet({"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "plant"}, "spec": {"storage": storage}})
    assert any(line.startswith(field) for line in error.value.errors), error.value.errors
