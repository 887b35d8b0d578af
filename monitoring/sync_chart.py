"""Copy the monitoring assets into the Helm chart: `python monitoring/sync_chart.py`.

    monitoring/dashboards/*.json  ->  charts/sensorfleet/dashboards/*.json   (ConfigMaps, grafana_dashboard: "1")
    monitoring/rules.yaml         ->  charts/sensorfleet/templates/monitoring-prometheusrule.yaml

monitoring/ is the one source; tests/monitoring/test_chart_assets.py fails when the chart's copies
differ. The rules are embedded in the template with Helm's `{{` / `}}` escaped, because Prometheus
alert templates (`{{ $labels.fleet }}`) use the same delimiters as Helm.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
CHART = ROOT / "charts" / "sensorfleet"
RULES = MONITORING / "rules.yaml"
RULE_TEMPLATE = CHART / "templates" / "monitoring-prometheusrule.yaml"

HEADER = """\
{{- /* Generated from monitoring/rules.yaml by `python monitoring/sync_chart.py`: edit that file, not this one. */ -}}
{{- if (dig "prometheusRule" "enabled" false .Values.monitoring) }}
# The SensorFleet alert rules (monitoring/rules.yaml) for the Prometheus Operator.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: {{ include "sensorfleet.fullname" . }}
  namespace: {{ default .Release.Namespace (dig "prometheusRule" "namespace" "" .Values.monitoring) }}
  labels:
    {{- include "sensorfleet.labels" . | nindent 4 }}
    {{- with (dig "prometheusRule" "labels" dict .Values.monitoring) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
"""
FOOTER = "{{- end }}\n"


def escape_for_helm(text: str) -> str:
    """Make `{{` and `}}` literal in a Helm template (one pass, so the escapes are not escaped)."""
    return re.sub(r"\{\{|\}\}", lambda m: '{{ "{{" }}' if m.group() == "{{" else '{{ "}}" }}', text)


def rule_template(rules_text: str) -> str:
    body = rules_text[rules_text.index("groups:"):]  # the header comment is about the plain file
    indented = "".join(f"  {line}" if line.strip() else line for line in body.splitlines(keepends=True))
    return HEADER + escape_for_helm(indented) + FOOTER


def dashboard_pairs() -> list[tuple[Path, Path]]:
    return [(source, CHART / "dashboards" / source.name) for source in sorted((MONITORING / "dashboards").glob("*.json"))]


def main() -> int:
    (CHART / "dashboards").mkdir(exist_ok=True)
    for source, target in dashboard_pairs():
        shutil.copyfile(source, target)
        print(f"{source.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    RULE_TEMPLATE.write_text(rule_template(RULES.read_text()))
    print(f"{RULES.relative_to(ROOT)} -> {RULE_TEMPLATE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
