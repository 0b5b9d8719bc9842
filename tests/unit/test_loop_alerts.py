"""The loop-fault alert (monitoring/alerts.yml) fires on a fault and stays quiet without one,
evaluated by promtool with the same harness as the other alerts (tests/unit/test_monitoring.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_monitoring import ALERTS, HEALTHY, Case, P, _rule_test

FAULTS = f'{P}loop_faults_total{{loop="verify"}}'
CASES = [
    Case("no loop fault", {FAULTS: "0x120"}, "25m", []),
    Case("a loop fault", {FAULTS: "0 0 0 1x120"}, "5m", ["VicifastAgentLoopFaults"]),
    Case("a loop fault long ago", {FAULTS: "0 1x120"}, "60m", []),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_loop_fault_alert(case: Case, promtool: str, tmp_path: Path) -> None:
    assert set(case.changed) - set(HEALTHY)  # the healthy series stay as they are
    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [_rule_test(case)]}
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(json.dumps(spec))  # JSON is YAML
    done = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
