"""TimeGPT through the real `nixtla` client against a local HTTP stub of the two endpoints it
calls (GET /model_params, POST /v2/forecast): the one faked server, since the service is paid."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

INPUT_SIZE, MODEL_HORIZON = 240, 60
STUB_HALF_WIDTH = 0.75


class StubNixtla(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: StubNixtla

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        self.server.requests.append({"method": "GET", "path": url.path, "query": parse_qs(url.query), "headers": dict(self.headers)})
        if url.path != "/model_params":
            return self._reply(404, {"detail": "not found"})
        self._reply(200, {"detail": {"input_size": INPUT_SIZE, "horizon": MODEL_HORIZON}})

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("content-encoding") == "zstd":
            import zstandard

            body = zstandard.ZstdDecompressor().decompress(body)
        payload = orjson.loads(body)
        self.server.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": payload})
        if self.path != "/v2/forecast":
            return self._reply(404, {"detail": "not found"})
        if self.headers.get("Authorization") != "Bearer test-key":
            return self._reply(401, {"detail": "bad key"})
        # The forecast of each series: its last value, +- a fixed half width for every level.
        y, sizes, h = payload["series"]["y"], payload["series"]["sizes"], payload["h"]
        ends = np.cumsum(sizes)
        mean = np.repeat([y[e - 1] for e in ends], h).tolist()
        intervals = {f"{side}-{lv}": [m + sign * STUB_HALF_WIDTH for m in mean] for lv in payload.get("level") or [] for side, sign in (("lo", -1), ("hi", 1))}
        self._reply(200, {"data": {"mean": mean, "intervals": intervals or None, "weights_x": None}})


@pytest.fixture
def stub() -> Iterator[StubNixtla]:
    server = StubNixtla()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_timegpt_through_the_client(stub: StubNixtla, dataset: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIXTLA_API_KEY", "test-key")
    monkeypatch.setenv("NIXTLA_BASE_URL", stub.url)
    out = tmp_path / "out"
    result = runner.invoke(app, ["forecast", "--data", str(dataset), "--out", str(out), "--model", "timegpt", "--horizon", "30", "--cv-windows", "1", "--level", "90", "--quiet"])
    assert result.exit_code == 0, result.output

    params = [r for r in stub.requests if r["method"] == "GET"]
    assert params and params[0]["path"] == "/model_params" and params[0]["query"]["freq"] == ["1min"]
    assert params[0]["headers"]["Authorization"] == "Bearer test-key"
    posts = [r for r in stub.requests if r["method"] == "POST"]
    # One forecast per origin: the CV window, the hold-out and the future.
    assert [p["path"] for p in posts] == ["/v2/forecast"] * 3
    for post in posts:
        body, headers = post["body"], post["headers"]
        assert headers["Authorization"] == "Bearer test-key" and headers["Content-Type"] == "application/json"
        assert body["h"] == 30 and body["freq"] == "1min" and body["level"] == [90]
        # 6 series, each cut by the client to 3 * input_size + horizon values (it asked for intervals).
        assert body["series"]["sizes"] == [3 * INPUT_SIZE + MODEL_HORIZON] * 6
        assert len(body["series"]["y"]) == sum(body["series"]["sizes"])

    table = pq.read_table(out / "forecasts.parquet").to_pandas()
    assert {"TimeGPT", "TimeGPT-lo-90", "TimeGPT-hi-90", "SeasonalNaive"} <= set(table.columns)
    future = table[table["window"] == "future"]
    assert len(future) == 6 * 30 and future["TimeGPT"].notna().all()
    # The stub forecasts each series' last value sent: the client's answer reached the table.
    future_body = posts[-1]["body"]["series"]
    last_values = np.array(future_body["y"])[np.cumsum(future_body["sizes"]) - 1]
    per_series = future.groupby("unique_id", sort=True)["TimeGPT"].first().to_numpy()
    np.testing.assert_allclose(np.sort(per_series), np.sort(last_values))
    np.testing.assert_allclose(future["TimeGPT-hi-90"] - future["TimeGPT"], STUB_HALF_WIDTH)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["headline"]["model"] == "TimeGPT" and metrics["holdout"]["models"]["TimeGPT"]["mae"] is not None


def test_timegpt_without_a_key_says_how_to_set_it(dataset: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIXTLA_API_KEY", raising=False)
    result = runner.invoke(app, ["forecast", "--data", str(dataset), "--out", str(tmp_path / "out"), "--model", "timegpt", "--quiet"])
    assert result.exit_code == 2
    assert "export NIXTLA_API_KEY=" in result.output and "Traceback" not in result.output


def test_timegpt_service_errors_are_one_line(stub: StubNixtla, dataset: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIXTLA_API_KEY", "wrong-key")
    monkeypatch.setenv("NIXTLA_BASE_URL", stub.url)
    result = runner.invoke(app, ["forecast", "--data", str(dataset), "--out", str(tmp_path / "out"), "--model", "timegpt", "--cv-windows", "0", "--quiet"])
    assert result.exit_code == 1, result.output
    assert "TimeGPT request failed" in result.output and "401" in result.output
