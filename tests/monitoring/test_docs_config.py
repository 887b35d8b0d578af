"""The scrape configuration docs/monitoring.md tells users to copy is valid Prometheus configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "monitoring.md"


def snippets() -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)]


def promtool_check_config(config: dict, path: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (apt-get install prometheus)"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)


def test_local_file_sd_snippet_is_valid(tmp_path: Path) -> None:
    config = next(s for s in snippets() if "rule_files" in s)
    assert config["scrape_configs"][0]["file_sd_configs"] and config["scrape_configs"][0]["honor_labels"] is True
    config["rule_files"] = [str(ROOT / "monitoring" / "rules.yaml")]
    result = promtool_check_config(config, tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_kubernetes_sd_snippet_relabelling_is_valid(tmp_path: Path) -> None:
    config = next(s for s in snippets() if "kubernetes_sd_configs" in s.get("scrape_configs", [{}])[0])
    job = config["scrape_configs"][0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "fleet", "component", "protocol"} <= targets  # what the dashboard and rules use
    # Debian's Prometheus is built without Kubernetes discovery: check the rest of the job (the
    # relabelling) with a static target in its place.
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:9100"]}]
    result = promtool_check_config(config, tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
