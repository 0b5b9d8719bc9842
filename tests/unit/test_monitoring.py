"""The monitoring kit (monitoring/): alert rules that promtool accepts and that fire when they
should (promtool's own rule unit tests), and a dashboard and rules over metrics the agent exports.

promtool comes from Debian's ``prometheus`` package: without it these tests skip, and FAIL when
``CI=true`` (tests/conftest.py's rule).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "monitoring" / "alerts.yml"
ALERT_TESTS = ROOT / "monitoring" / "alerts_test.yml"
DASHBOARD = ROOT / "monitoring" / "dashboard.json"
METRICS_SOURCES = sorted((ROOT / "agent" / "metrics").glob("*.py"))
_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")
P = "vicifast_agent_"
BIG = 10_000_000_000  # a not-after far in the future (Unix seconds)
SCRAPE_LABELS = 'job="vicifast-agent",instance="a"'


def exported_metrics() -> set[str]:
    """The metric family names the agent's code registers (``PREFIX + "name"``)."""
    names = set()
    for source in METRICS_SOURCES:
        names |= {P + n for n in re.findall(r'PREFIX \+ "(\w+)"', source.read_text())}
    assert names, "no metric names found in agent/metrics: the naming scheme changed"
    return names


def family_of(sample_name: str) -> str:
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix):
            return sample_name.removesuffix(suffix)
    return sample_name


def used_metrics(text: str) -> set[str]:
    return {family_of(n) for n in re.findall(rf"\b{P}\w+", text)}


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the rules fire when they should, and only then ------------------------------------------

HEALTHY = {
    'up{job="vicifast-agent"}': "1x120",
    f"{P}in_sync": "1x120",
    # equal to the evaluation clock: verified just now, at every step
    f"{P}last_verification_timestamp_seconds": "0+60x120",
    f"{P}drift_repairs_total": "0x120",
    f"{P}shadowing_detected": "0x120",
    f'{P}set_fill_ratio{{family="ipv4",profile="agent"}}': "0.2x120",
    f"{P}entries_expiring_within_hour": "10x120",
    f'{P}entries{{family="ipv4",profile="agent"}}': "1000x120",
    f'{P}certificate_not_after_timestamp_seconds{{certificate="server"}}': f"{BIG}x120",
    f'{P}auth_failures_total{{reason="bad_signature"}}': "0x120",
    f"{P}kernel_transaction_failures_total": "0x120",
    f"{P}flow_cut_failures_total": "0x120",
    f'{P}build_info{{version="0.1.0",python="3.11.2",nft="1.0.6"}}': "1x120",
    "process_resident_memory_bytes": f"{200 * 2**20}x120",
    f"{P}memory_limit_bytes": f"{768 * 2**20}x120",
    "process_open_fds": "40x120",
    "process_max_fds": "65536x120",
    f"{P}drift_repair_storm": "0x120",
}


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    changed: dict[str, str]  # series -> promtool values, replacing the healthy ones
    at: str  # evaluation time
    firing: Sequence[str]  # alert names expected to fire, and no others


CASES = [
    Case("healthy", {}, "25m", []),
    Case("down 5 minutes", {'up{job="vicifast-agent"}': "0x120"}, "6m", ["VicifastAgentDown"]),
    Case("down 4 minutes is not yet an alert", {'up{job="vicifast-agent"}': "0x120"}, "4m", []),
    Case("out of sync", {f"{P}in_sync": "0x120"}, "3m", ["VicifastAgentTableOutOfSync"]),
    Case(
        "verification stopped",
        {f"{P}last_verification_timestamp_seconds": "0x120"},
        "11m",
        ["VicifastAgentVerificationStale"],
    ),
    Case(
        "drift repaired often",
        {f"{P}drift_repairs_total": "0+1x120"},
        "10m",
        ["VicifastAgentDriftRepairs"],
    ),
    Case("drift repaired once", {f"{P}drift_repairs_total": "0 1x120"}, "10m", []),
    Case(
        "shadowing", {f"{P}shadowing_detected": "1x120"}, "11m", ["VicifastAgentShadowingDetected"]
    ),
    Case(
        "set nearly full",
        {f'{P}set_fill_ratio{{family="ipv4",profile="agent"}}': "0.95x120"},
        "11m",
        ["VicifastAgentSetNearlyFull"],
    ),
    Case(
        "most entries expire within the hour",
        {f"{P}entries_expiring_within_hour": "900x120"},
        "16m",
        ["VicifastAgentMassExpiryAhead"],
    ),
    Case(
        "a few entries expire within the hour",
        {f"{P}entries_expiring_within_hour": "60x120"},
        "16m",
        [],
    ),
    Case(
        "certificate expires in 10 days",
        {f'{P}certificate_not_after_timestamp_seconds{{certificate="server"}}': "864000x120"},
        "61m",
        ["VicifastAgentCertificateExpiringSoon"],
    ),
    Case(
        "certificate expires tomorrow",
        {f'{P}certificate_not_after_timestamp_seconds{{certificate="server"}}': "86400x120"},
        "61m",
        ["VicifastAgentCertificateExpiringSoon", "VicifastAgentCertificateExpiringVerySoon"],
    ),
    Case(
        "authentication failures at 1/s",
        {f'{P}auth_failures_total{{reason="bad_signature"}}': "0+60x120"},
        "16m",
        ["VicifastAgentAuthFailuresSpiking"],
    ),
    Case(
        "a kernel transaction failed",
        {f"{P}kernel_transaction_failures_total": "0 0 0 1x120"},
        "5m",
        ["VicifastAgentKernelTransactionsFailing"],
    ),
    Case(
        "element conflicts were retried",
        {f'{P}kernel_transaction_failures_total{{reason="element_conflict"}}': "0 0 0 1 2 3x120"},
        "5m",
        [],
    ),
    Case(
        "memory peaked near the limit",
        {"process_resident_memory_bytes": f"{200 * 2**20}x10 {700 * 2**20} {200 * 2**20}x100"},
        "15m",
        ["VicifastAgentMemoryNearLimit"],
    ),
    Case(
        "memory near the limit without one (unlimited cgroup)",
        {
            "process_resident_memory_bytes": f"{700 * 2**20}x120",
            f"{P}memory_limit_bytes": "_x120",
        },
        "15m",
        [],
    ),
    Case(
        "descriptors near the limit",
        {"process_open_fds": "60000x120"},
        "11m",
        ["VicifastAgentFileDescriptorsNearLimit"],
    ),
    Case(
        "another job's process near its descriptor limit",
        {
            "process_open_fds": "60000x120",
            f'{P}build_info{{version="0.1.0",python="3.11.2",nft="1.0.6"}}': "_x120",
        },
        "11m",
        [],
    ),
    Case(
        "a flow of a revoked source could not be cut",
        {f"{P}flow_cut_failures_total": "0 0 0 1x120"},
        "5m",
        ["VicifastAgentFlowCutsFailing"],
    ),
    Case(
        "two agents fight over the table",
        {f"{P}drift_repair_storm": "0 0 1x120"},
        "5m",
        ["VicifastAgentRepairStorm"],
    ),
    Case(
        "a minute of many repairs is no storm alert yet",
        {f"{P}drift_repair_storm": "0 0 1 0x120"},
        "5m",
        [],
    ),
]


def _as_scraped(series: str) -> str:
    """The series as a real scrape labels it: the scrape's ``job`` and ``instance`` on every one
    (rules that join series must survive both labels)."""
    name, _, labels = series.partition("{")
    own = [pair for pair in labels.rstrip("}").split(",") if pair and not pair.startswith("job=")]
    return f"{name}{{{','.join([SCRAPE_LABELS, *own])}}}"


def _rule_test(case: Case) -> dict[str, object]:
    series = {**HEALTHY, **case.changed}
    return {
        "interval": "1m",
        "input_series": [
            # every series spans the whole test (120 min): "absent" never stands in for "healthy"
            {"series": _as_scraped(s), "values": v}
            for s, v in series.items()
        ],
        "promql_expr_test": [
            {
                "expr": 'count by (alertname) (ALERTS{alertstate="firing"})',
                "eval_time": case.at,
                "exp_samples": [
                    {"labels": f'{{alertname="{a}"}}', "value": 1} for a in sorted(case.firing)
                ],
            }
        ],
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_alert_fires_exactly_when_its_condition_holds(
    case: Case, promtool: str, tmp_path: Path
) -> None:
    spec = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [_rule_test(case)],
    }
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(json.dumps(spec))  # JSON is YAML
    done = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the shipped rule tests (monitoring/alerts_test.yml) -----------------------------------


def test_shipped_rule_tests_pass_promtool(promtool: str) -> None:
    done = subprocess.run(
        [promtool, "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _shipped_input_series() -> list[str]:
    return re.findall(r"- series: '([^']*)'", ALERT_TESTS.read_text())


def test_shipped_rule_tests_label_every_series_as_a_scrape_does() -> None:
    series = _shipped_input_series()
    assert series, "no input series found in alerts_test.yml: its layout changed"
    unlabelled = [s for s in series if not ('job="' in s and 'instance="' in s)]
    assert not unlabelled, f"series without the scrape's job and instance: {unlabelled}"


def test_shipped_rule_tests_cover_every_alert() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", ALERTS.read_text(), re.MULTILINE))
    tested = set(re.findall(r"\b(VicifastAgent\w+)", ALERT_TESTS.read_text()))
    assert alerts, "no alerts found in alerts.yml: its layout changed"
    assert alerts - tested == set(), "alerts without a case in alerts_test.yml"


# --- the kit speaks the agent's metric names -----------------------------------------------


def test_alert_rules_use_only_metrics_the_agent_exports() -> None:
    unknown = used_metrics(ALERTS.read_text()) - exported_metrics()
    assert not unknown, f"alerts.yml uses metrics the agent does not export: {sorted(unknown)}"


def test_dashboard_shows_every_agent_metric_and_nothing_else() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = used_metrics("\n".join(queries))
    exported = exported_metrics()
    assert used - exported == set(), "dashboard queries unknown metrics"
    assert exported - used == set(), "agent metrics missing from the dashboard"


def test_dashboard_panels_follow_the_instance_and_datasource_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], panel["title"]
