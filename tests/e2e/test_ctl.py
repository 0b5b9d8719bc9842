"""``vicifast-agent ctl`` and ``make demo`` for real: the CLI as a subprocess against the daemon.

Each call runs the real command inside the agent's namespace (``ip netns exec``), where the
daemon listens on loopback, with the dev PKI's options from ``DevAgent.client_argv()``. Output
is checked as JSON values; human output is checked for the values it must show. Exit codes are
the CLI's contract: 1 refused, 2 usage, 3 unreachable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from netlab import Lab

from agent.ctl.connection import connection_file_text
from agent.devlab import REPO_ROOT, DevAgent

USAGE, REFUSED, UNREACHABLE = 2, 3, 4  # agent.cli_contract


def ctl(
    agent: DevAgent,
    *args: str,
    options: Sequence[str] | None = None,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", agent.netns, sys.executable, "-m", "agent", "ctl", *args]
    argv += agent.client_argv() if options is None else options
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VICIFAST_CTL_")}
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
        env={**environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(done))


def entries(agent: DevAgent) -> dict[str, dict[str, Any]]:
    return {e["address"]: e for e in as_json(ctl(agent, "state", "--json"))["entries"]}


def state_version(agent: DevAgent) -> int:
    version: int = as_json(ctl(agent, "state", "--json"))["state_version"]
    return version


# --- allow and state ----------------------------------------------------------------------------


def test_allow_admits_and_state_lists_it_as_json(lab: Lab, agent: DevAgent) -> None:
    src4, src6 = lab.addr.client4, lab.addr.client6
    before = state_version(agent)
    result = as_json(
        ctl(agent, "allow", src4, src6, "--ttl", "600", "--subject", "alice", "--json")
    )
    assert [(r["address"], r["status"]) for r in result["results"]] == [
        (src4, "ADDED"),
        ("2001:db8:0:1::/64", "ADDED"),  # the agent's /64 normal form
    ]
    assert result["state_version"] == before + 2
    state = as_json(ctl(agent, "state", "--json"))
    assert state["agent_id"] == agent.agent_id
    assert state["state_version"] == before + 2
    listed = {e["address"]: e for e in state["entries"]}
    assert set(listed) == {src4, "2001:db8:0:1::/64"}
    assert listed[src4]["subject"] == "alice"
    assert listed[src4]["request_id"] == result["request_id"]
    expires_in = listed[src4]["expires_at_unix_ms"] - state["now_unix_ms"]
    assert 590_000 <= expires_in <= 600_000
    assert lab.reaches("udp", 5060, family=4)


def test_allow_and_state_for_humans(lab: Lab, agent: DevAgent) -> None:
    src = lab.addr.client4
    allowed = ok(ctl(agent, "allow", src, "--subject", "bob", "--ttl", "3600"))
    assert re.search(rf"^{re.escape(src)}\s+agent\s+ADDED\s+\S+Z \(in 59m 5\ds\)", allowed, re.M)
    state = ok(ctl(agent, "state"))
    assert re.search(rf"^{re.escape(src)}\s+agent\s+bob\s+\S+Z \(in 59m 5\ds\)", state, re.M)
    assert f"agent        {agent.agent_id}," in state
    assert "ruleset      in sync" in state


def test_allow_refreshes_an_existing_entry(lab: Lab, agent: DevAgent) -> None:
    src = lab.addr.client4
    ok(ctl(agent, "allow", src, "--subject", "alice"))
    again = as_json(ctl(agent, "allow", src, "--subject", "alice2", "--json"))
    assert [r["status"] for r in again["results"]] == ["REFRESHED"]
    assert entries(agent)[src]["subject"] == "alice2"


# --- revoke, sync, erase --------------------------------------------------------------------


def test_revoke_removes_the_entry_and_reports_absent_ones(lab: Lab, agent: DevAgent) -> None:
    src = lab.addr.client4
    ok(ctl(agent, "allow", src))
    assert lab.reaches("udp", 5060, family=4)
    result = as_json(ctl(agent, "revoke", src, "198.18.0.99", "--json"))
    assert [(r["address"], r["status"]) for r in result["results"]] == [
        (src, "REMOVED"),
        ("198.18.0.99", "NOT_FOUND"),
    ]
    assert entries(agent) == {}
    assert not lab.reaches("udp", 5060, family=4)


def test_revoke_by_subject_for_humans(lab: Lab, agent: DevAgent) -> None:
    a, b = lab.addr.client4, lab.addr.client4_alt
    ok(ctl(agent, "allow", a, b, "--subject", "carol"))
    out = ok(ctl(agent, "revoke", "--subject", "carol"))
    assert re.search(rf"^{re.escape(a)}\s+agent\s+REMOVED\s+-", out, re.M)
    assert re.search(rf"^{re.escape(b)}\s+agent\s+REMOVED\s+-", out, re.M)
    assert entries(agent) == {}


def test_sync_from_json_lines_csv_and_stdin(tmp_path: Path, lab: Lab, agent: DevAgent) -> None:
    a, b, far = lab.addr.client4, lab.addr.client4_alt, lab.addr.client4_far
    ok(ctl(agent, "allow", far))
    jsonl = tmp_path / "grants.jsonl"
    jsonl.write_text(
        json.dumps({"address": a, "ttl_seconds": 600, "subject": "alice"})
        + "\n"
        + json.dumps({"address": b})
        + "\n"
    )
    result = as_json(ctl(agent, "sync", str(jsonl), "--json"))
    assert {(r["address"], r["status"]) for r in result["results"]} == {
        (a, "ADDED"),
        (b, "ADDED"),
        (far, "REMOVED"),
    }
    assert set(entries(agent)) == {a, b}

    csv_file = tmp_path / "grants.csv"
    csv_file.write_text(f"address,subject\n{far},dave\n")
    ok(ctl(agent, "sync", str(csv_file)))
    assert {k: v["subject"] for k, v in entries(agent).items()} == {far: "dave"}

    ok(ctl(agent, "sync", "-", "--format", "csv", stdin=f"address\n{a}\n"))
    assert set(entries(agent)) == {a}


def test_an_empty_sync_needs_allow_empty(tmp_path: Path, lab: Lab, agent: DevAgent) -> None:
    ok(ctl(agent, "allow", lab.addr.client4))
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    refused = ctl(agent, "sync", str(empty))
    assert refused.returncode == USAGE
    assert refused.stderr.startswith("vicifast-agent: error: empty_sync")
    assert set(entries(agent)) == {lab.addr.client4}
    ok(ctl(agent, "sync", str(empty), "--allow-empty"))
    assert entries(agent) == {}


def test_erase_revokes_and_reports_erased_records(lab: Lab, agent: DevAgent) -> None:
    a, b = lab.addr.client4, lab.addr.client4_alt
    ok(ctl(agent, "allow", a, "--subject", "erin"))
    ok(ctl(agent, "allow", b, "--subject", "frank"))
    result = as_json(ctl(agent, "erase", "erin", "--json"))
    assert [(r["address"], r["status"]) for r in result["results"]] == [(a, "REMOVED")]
    assert result["erased_records"] > 0
    assert set(entries(agent)) == {b}
    human = ok(ctl(agent, "erase", "frank"))
    assert re.search(r"erased_records [1-9]\d*$", human.splitlines()[0])


# --- watch ------------------------------------------------------------------------------------


def test_watch_count_json_prints_that_many_events_then_exits(lab: Lab, agent: DevAgent) -> None:
    a, b = lab.addr.client4, lab.addr.client4_alt
    since = state_version(agent)
    ok(ctl(agent, "allow", a, b, "--subject", "gina"))
    ok(ctl(agent, "revoke", a))
    watch = ctl(agent, "watch", "--since", str(since), "--count", "2", "--json")
    events = [json.loads(line) for line in ok(watch).splitlines()]
    assert [(e["state_version"], e["kind"], e["entry"]["address"]) for e in events] == [
        (since + 1, "ADDED", a),
        (since + 2, "ADDED", b),
    ]
    assert events[0]["entry"]["subject"] == "gina"


def test_watch_streams_live_events_for_humans(lab: Lab, agent: DevAgent) -> None:
    since = state_version(agent)
    argv = ["ip", "netns", "exec", agent.netns, sys.executable, "-m", "agent", "ctl", "watch"]
    argv += ["--since", str(since), "--count", "1", *agent.client_argv()]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env) as w:
        # Whether the watch subscribes before or after this change, the event is after `since`.
        ok(ctl(agent, "allow", lab.addr.client4, "--subject", "hana"))
        out, _ = w.communicate(timeout=30)
    assert w.returncode == 0
    assert re.fullmatch(
        rf"#{since + 1}  \S+Z  ADDED  {re.escape(lab.addr.client4)}  agent  subject=hana"
        r"  expires \S+Z \(in 23h 59m\)\n",
        out,
    )


# --- errors and exit codes ----------------------------------------------------------------------


def test_a_refused_request_exits_3_with_the_reason_and_changes_nothing(
    lab: Lab, agent: DevAgent
) -> None:
    ok(ctl(agent, "allow", lab.addr.client4))
    before = as_json(ctl(agent, "state", "--json"))
    done = ctl(agent, "allow", lab.addr.client4_alt, "--ttl", "1")
    assert done.returncode == REFUSED
    assert done.stdout == ""
    assert done.stderr.startswith("vicifast-agent: error: invalid_ttl")
    assert "[INVALID_ARGUMENT]" in done.stderr
    as_json_error = ctl(agent, "allow", lab.addr.client4_alt, "--ttl", "1", "--json")
    assert as_json_error.returncode == REFUSED
    error = json.loads(as_json_error.stdout)["error"]
    assert (error["reason"], error["code"], error["exit_code"]) == (
        "invalid_ttl",
        "INVALID_ARGUMENT",
        REFUSED,
    )
    after = as_json(ctl(agent, "state", "--json"))
    assert (after["state_version"], after["entries"]) == (
        before["state_version"],
        before["entries"],
    )


def test_an_unreachable_agent_exits_4_and_says_how_to_retry(agent: DevAgent) -> None:
    options = agent.client_argv()
    options[options.index("--target") + 1] = "127.0.0.1:1"  # nothing listens there
    state = ctl(agent, "state", options=options)
    assert state.returncode == UNREACHABLE
    assert state.stderr.startswith("vicifast-agent: error: unreachable")
    allow = ctl(agent, "allow", "198.18.0.2", "--request-id", "retry-0001", options=options)
    assert allow.returncode == UNREACHABLE
    assert re.search(r"--request-id retry-0001 --issued-at \d+", allow.stderr)
    pinned = ctl(
        agent, "allow", "198.18.0.2", "--request-id", "retry-0002", "--json", options=options
    )
    assert pinned.returncode == UNREACHABLE
    error = json.loads(pinned.stdout)["error"]
    assert (error["reason"], error["request_id"]) == ("unreachable", "retry-0002")
    assert isinstance(error["issued_at_ms"], int)


def test_a_resent_request_is_answered_once(lab: Lab, agent: DevAgent) -> None:
    pin = ["--request-id", "resend-0001", "--issued-at", str(_now_ms(agent))]
    first = as_json(ctl(agent, "allow", lab.addr.client4, *pin, "--json"))
    second = as_json(ctl(agent, "allow", lab.addr.client4, *pin, "--json"))
    assert second == first
    assert state_version(agent) == first["state_version"]
    other = ctl(agent, "allow", lab.addr.client4_alt, *pin)
    assert other.returncode == REFUSED
    assert other.stderr.startswith("vicifast-agent: error: request_id_reused")


def _now_ms(agent: DevAgent) -> int:
    now: int = as_json(ctl(agent, "state", "--json"))["now_unix_ms"]
    return now


# --- settings from a file or the environment ----------------------------------------------------


def settings(agent: DevAgent) -> dict[str, str]:
    argv = agent.client_argv()
    return {argv[i][2:].replace("-", "_"): argv[i + 1] for i in range(0, len(argv), 2)}


def test_settings_from_a_connection_file(tmp_path: Path, lab: Lab, agent: DevAgent) -> None:
    conn = tmp_path / "ctl.toml"
    conn.write_text(connection_file_text(settings(agent)))
    done = ctl(agent, "allow", lab.addr.client4, "--connection", str(conn), options=[])
    assert ok(done)
    env = {"VICIFAST_CTL_CONNECTION": str(conn)}
    assert lab.addr.client4 in {e["address"] for e in _state(agent, env)["entries"]}


def test_settings_from_the_environment(agent: DevAgent) -> None:
    env = {f"VICIFAST_CTL_{k.upper()}": v for k, v in settings(agent).items()}
    assert _state(agent, env)["agent_id"] == agent.agent_id


def _state(agent: DevAgent, env: Mapping[str, str]) -> Any:
    return as_json(ctl(agent, "state", "--json", options=[], env=env))


# --- make demo ----------------------------------------------------------------------------------


def test_the_demo_succeeds_twice_in_a_row_and_leaves_nothing_behind() -> None:
    # Under tests/e2e, the kernel requirement (and its CI rule) applies; the demo makes its own
    # namespaces.
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "agent.demo"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=REPO_ROOT,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.rstrip().splitlines()[-1].startswith("demo OK")
        made = set(re.findall(r"vf-demo-(?:srv|phone)-[0-9a-f]+", done.stdout))
        assert len(made) == 2
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
        assert not made & set(re.findall(r"\S+", left.stdout))
        tmp = re.search(r"--config (\S+)/agent/agent\.toml", done.stdout)
        assert tmp is not None
        assert not Path(tmp.group(1)).exists()
