"""Object storage against a real SeaweedFS: `sensorfleet run --data s3://…` with only the standard
AWS variables set, the bucket created on the fly, plain pandas + s3fs reading the result, and
compaction on the object store."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import s3fs

from sensorfleet.compaction import compact
from sensorfleet.dataset import dataset_files, read_dataset

from .test_compaction import small_files_dataset  # the same small-files layout as locally


FLEET = """
apiVersion: sensorfleet.io/v1alpha1
kind: SensorFleet
metadata: {name: demo}
spec:
  protocols:
    mqtt: {enabled: true, devices: 5, interval: 1.0}
    coap: {enabled: true, devices: 3, interval: 1.0}
    opcua: {enabled: false}
"""


def test_sensorfleet_run_writes_to_s3_and_plain_pandas_reads_it(s3_env, tmp_path: Path) -> None:
    bucket = f"demo-{uuid.uuid4().hex[:8]}"  # does not exist yet: the collectors create it
    url = f"s3://{bucket}/fleet"
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    run = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "run", str(fleet), "--data", url, "--duration", "12",
                          "--no-live", "--logs", str(tmp_path / "logs")], capture_output=True, text=True, timeout=300, env=s3_env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    frame = pd.read_parquet(url)  # plain pandas + s3fs, configured by the environment alone
    assert len(frame) > 0 and set(frame["protocol"].astype(str)) == {"mqtt", "coap"}
    assert not frame.duplicated(["protocol", "device", "sensor", "seq"]).any()
    summary = [line for line in run.stdout.splitlines() if line.startswith("rows in the dataset")]
    assert summary and f"mqtt {(frame['protocol'] == 'mqtt').sum()}" in summary[0], run.stdout[-1500:]
    assert s3fs.S3FileSystem().exists(bucket)


def test_compaction_on_the_object_store_keeps_every_key(s3_env) -> None:
    url = f"s3://compact-{uuid.uuid4().hex[:8]}/data"
    start = (datetime.now(timezone.utc) - timedelta(hours=4)).replace(minute=0, second=0, microsecond=0)
    n = _write_small_files(url, start, small_files_dataset)
    before = read_dataset(url, columns=["device", "sensor", "seq"]).sort_values(["device", "sensor", "seq"]).reset_index(drop=True)
    files = len(dataset_files(url))
    result = compact(url)
    assert result.rows == n == len(before) and result.files_in == files
    after = read_dataset(url, columns=["device", "sensor", "seq"]).sort_values(["device", "sensor", "seq"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(after, before)
    assert len(dataset_files(url)) == result.hours_compacted == 2
    assert compact(url).hours_compacted == 0


def _write_small_files(url: str, start: datetime, writer) -> int:
    return writer(url, start, hours=2, per_file=600)


FORECAST_FLEET = """
apiVersion: sensorfleet.io/v1alpha1
kind: SensorFleet
metadata: {name: s3-forecast}
spec:
  seed: 3
  protocols:
    mqtt: {enabled: true, devices: 2, interval: 60}
    coap: {enabled: false}
    opcua: {enabled: false}
  forecasting: {horizon: 60}
"""


def test_the_forecast_report_of_an_s3_fleet_lands_beside_its_dataset(s3_env, tmp_path: Path) -> None:
    """What the forecast CronJob of a fleet with `storage.url: s3://…` runs: `--out` is the URL of
    `_reports` beside the dataset, and every file of the report ends up there, readable by s3fs."""
    url = f"s3://forecast-{uuid.uuid4().hex[:8]}/fleet"
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FORECAST_FLEET)
    cli = [sys.executable, "-m", "sensorfleet.cli"]
    made = subprocess.run([*cli, "generate", str(fleet), "--days", "2", "--data", url, "--quiet"],
                          capture_output=True, text=True, timeout=600, env=s3_env)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    reports = f"{url}/_reports"
    run = subprocess.run([*cli, "forecast", "--data", url, "--out", reports, "--fleet", str(fleet), "--quiet"],
                         capture_output=True, text=True, timeout=900, env=s3_env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"report: {reports}/report.html" in run.stdout
    store = s3fs.S3FileSystem()
    names = {path.rsplit("/", 1)[-1] for path in store.find(reports.removeprefix("s3://"))}
    assert {"report.html", "metrics.json", "forecasts.parquet"} <= names, names
    assert any(name.endswith(".png") for name in names), names
    assert len(pd.read_parquet(f"{reports}/forecasts.parquet")) > 0
    assert not any(tmp_path.glob("s3*")), "nothing written to a local folder named after the URL"
    # The dataset's own readers skip the `_reports` folder, as they skip `_SUCCESS`-style names.
    assert set(pd.read_parquet(url)["protocol"].astype(str)) == {"mqtt"}
