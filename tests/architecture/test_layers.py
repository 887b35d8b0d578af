"""The layering STYLE.md asks for, checked: pure builders apart from the code that does I/O."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IO_MODULES = {"kopf", "kubernetes", "paho", "aiocoap", "asyncua", "prometheus_client", "socket", "subprocess", "requests", "httpx", "aiohttp"}
PURE_SENSORFLEET = {"sensorfleet.spec", "sensorfleet.spec_base", "sensorfleet.sources", "sensorfleet.mapping", "sensorfleet.reading", "sensorfleet.signals", "sensorfleet.broker"}
# The operator's pure modules: fleet -> manifests (builders.py assembles the *_builders and their
# shared pieces), children -> .status. They may import one another and the pure core only.
PURE_OPERATOR = {f"sensorfleet.operator.{name}" for name in (
    "builders", "child_meta", "pod_builders", "sizing", "storage_builders", "broker_builders", "workload_builders",
    "job_builders", "network_builders", "source_builders", "status")}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_import_linter_contracts_hold():
    result = subprocess.run([str(REPO / ".venv" / "bin" / "lint-imports")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_operator_builders_are_pure():
    """Fleet -> manifests: no kopf, no API client, no network; only pure SensorFleet modules."""
    for module in PURE_OPERATOR:
        name = module.rsplit(".", 1)[1] + ".py"
        path = REPO / "operator" / name
        imports = imported_modules(path)
        top_level = {m.split(".")[0] for m in imports}
        assert not top_level & IO_MODULES, f"operator/{name} imports {sorted(top_level & IO_MODULES)}"
        internal = {m for m in imports if m.startswith("sensorfleet.")}
        assert internal <= PURE_SENSORFLEET | PURE_OPERATOR | {"sensorfleet.operator"}, f"operator/{name} imports {sorted(internal - PURE_SENSORFLEET - PURE_OPERATOR)}"


def test_broker_module_renders_config_without_io_at_import():
    imports = imported_modules(REPO / "src" / "sensorfleet" / "broker.py")
    assert not {m.split(".")[0] for m in imports} & {"paho", "kopf", "kubernetes"}
