"""The sysadmin's CLI for real: ``vicifast-agent status|list|allow|revoke|doctor|why|audit``
as a subprocess in the agent's namespace, talking to the real daemon over its local socket.

One daemon serves the module (its own lab); every test uses its own addresses or subjects and
removes what it added. The local socket lives in a directory others may traverse, so the
``nobody`` user (uid 65534, a member of the configured group ``nogroup`` by its primary gid)
can reach it, and the file mode or the daemon's own check refuses everyone else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentRig
from netlab import Lab
from readable_install import ReadableInstall, make_readable_install

from agent.devlab import REPO_ROOT
from agent.rpc.client import Entry

TTL_CAP = 900
BURST = 40
STATIC = "198.19.5.0/24"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
OUTSIDER = ["setpriv", "--reuid=65534", "--regid=100", "--clear-groups"]  # not in nogroup
CONTROL_PLANE = "spiffe://vicifast/control-plane"  # the dev PKI's client identity
OK, NOT_ADMITTED, USAGE, REFUSED, UNREACHABLE, PROBLEMS = 0, 1, 2, 3, 4, 5  # cli_contract


@pytest.fixture(scope="module")
def readable() -> Iterator[ReadableInstall]:
    """The CLI as ``nobody`` can import it wherever the checkout is (under /root too)."""
    install = make_readable_install()
    yield install
    install.remove()


@pytest.fixture(scope="module")
def socket_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vf-local-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def rig(
    module_lab: Lab,
    tmp_path_factory: pytest.TempPathFactory,
    socket_dir: Path,
    readable: ReadableInstall,
) -> Iterator[AgentRig]:
    global _readable  # noqa: PLW0603  # cli() is called from many tests; one copy per module
    _readable = readable
    extra = "\n".join(
        [
            "[local]",
            f'socket = "{socket_dir / "local.sock"}"',
            'group = "nogroup"',
            f"ttl_cap_s = {TTL_CAP}",
            "rate_limit_per_minute = 1",
            f"rate_limit_burst = {BURST}",
            "[static_sources]",
            f'agent = ["{STATIC}"]',
        ]
    )
    with AgentRig.running(
        module_lab, tmp_path_factory.mktemp("admin"), extra_toml=extra
    ) as started:
        yield started


_readable: ReadableInstall | None = None


def cli(
    rig: AgentRig, *args: str, user: Sequence[str] = (), socket: Path | None = None
) -> subprocess.CompletedProcess[str]:
    sock = socket or Path(_socket(rig))
    python, cwd = sys.executable, REPO_ROOT
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    if user:  # another user may not read the checkout (under /root): the readable copy
        assert _readable is not None
        python, cwd, env = _readable.python, Path("/"), _readable.env()
    argv = ["ip", "netns", "exec", rig.agent.netns, *user, python, "-m", "agent"]
    argv += [*args, "--socket", str(sock), "--config", str(rig.agent.config_path)]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=180, check=False, cwd=cwd, env=env
    )


def _socket(rig: AgentRig) -> str:
    for line in rig.agent.config_path.read_text().splitlines():
        if line.startswith("socket = "):
            return line.split('"')[1]
    raise AssertionError("no [local] socket in the config")


def as_json(done: subprocess.CompletedProcess[str], code: int = OK) -> Any:
    assert done.returncode == code, (done.stdout, done.stderr)
    return json.loads(done.stdout)


def entries(rig: AgentRig) -> dict[str, dict[str, Any]]:
    return {e["address"]: e for e in as_json(cli(rig, "list", "--json"))["entries"]}


# --- status, list, allow, revoke ------------------------------------------------------------


def test_status_reports_entries_version_sync_and_listeners(rig: AgentRig) -> None:
    status = as_json(cli(rig, "status", "--json"))
    assert status["agent_id"] == rig.agent.agent_id
    assert status["in_sync"] is True
    assert status["listen"]["local"] == _socket(rig)
    assert status["listen"]["api"] == rig.agent.api_listen
    assert status["shadowing"] == []
    assert status["last_verified_at_ms"] > 0
    state = rig.client().state()
    assert status["state_version"] == state.state_version
    assert status["entries"] == len(state.entries)
    human = cli(rig, "status")
    assert human.returncode == OK, human.stderr
    assert f"state_version: {state.state_version}" in human.stdout
    assert "in sync" in human.stdout
    assert _socket(rig) in human.stdout


def test_local_allow_is_capped_marked_local_everywhere_and_opens_the_port(
    rig: AgentRig, module_lab: Lab
) -> None:
    src = module_lab.addr.client(4)
    assert not module_lab.reaches("udp", 5060, family=4)
    before = time.time()
    result = as_json(cli(rig, "allow", src, "--ttl", "86400", "--subject", "alice", "--json"))
    try:
        assert (result["ttl_s"], result["ttl_capped"]) == (TTL_CAP, True)
        (r,) = result["results"]
        assert (r["address"], r["status"]) == (src, "ADDED")
        assert before + TTL_CAP - 5 <= r["expires_at_ms"] / 1000 <= time.time() + TTL_CAP
        assert result["request_id"].startswith("local-")
        assert module_lab.reaches("udp", 5060, family=4)
        # State (the CLI's list and the control plane's GetState) and the kernel's comment.
        listed = entries(rig)[src]
        assert (listed["source"], listed["request_id"]) == ("local", result["request_id"])
        (remote_view,) = [e for e in rig.client().state().entries if e.address == src]
        assert remote_view.request_id == result["request_id"]
        assert remote_view.subject == "alice"
        listing = module_lab.srv.nft_json("list", "set", "inet", rig.agent.table, "allow4_agent")
        comments = [
            e["elem"]["comment"]
            for item in listing["nftables"]
            if "set" in item
            for e in item["set"].get("elem", ())
            if isinstance(e, dict) and e["elem"]["val"] == src
        ]
        assert comments == [f"local req={result['request_id']} sub=alice"]
        assert (
            0
            < next(
                e["elem"]["timeout"]
                for item in listing["nftables"]
                if "set" in item
                for e in item["set"]["elem"]
                if isinstance(e, dict) and e["elem"]["val"] == src
            )
            <= TTL_CAP
        )
    finally:
        as_json(cli(rig, "revoke", src, "--json"))
    assert not module_lab.reaches("udp", 5060, family=4)


def test_allow_list_and_revoke_in_human_form(rig: AgentRig) -> None:
    added = cli(rig, "allow", "198.18.200.1", "198.18.200.2", "--subject", "bob", "--ttl", "600")
    assert added.returncode == OK, added.stderr
    assert "ADDED" in added.stdout
    assert "local grant for 600 s" in added.stdout
    listed = cli(rig, "list", "--subject", "bob")
    assert listed.returncode == OK, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == ["ADDRESS", "PROFILE", "SUBJECT"]
    assert [ln.split()[0] for ln in lines[1:-1]] == ["198.18.200.1", "198.18.200.2"]
    assert all(" local " in ln for ln in lines[1:-1])
    assert (
        as_json(cli(rig, "list", "--profile", "agent", "--subject", "nobody-else", "--json"))[
            "entries"
        ]
        == []
    )
    revoked = cli(rig, "revoke", "--subject", "bob")
    assert revoked.returncode == OK, revoked.stderr
    assert revoked.stdout.count("REMOVED") == 2
    assert not {"198.18.200.1", "198.18.200.2"} & set(entries(rig))


def test_revoke_reports_not_found_and_changes_nothing(rig: AgentRig) -> None:
    before = as_json(cli(rig, "status", "--json"))["state_version"]
    result = as_json(cli(rig, "revoke", "198.18.200.9", "--json"))
    assert [r["status"] for r in result["results"]] == ["NOT_FOUND"]
    assert as_json(cli(rig, "status", "--json"))["state_version"] == before


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["allow", "10.0.0.1"], "address_not_global"),
        (["allow", "198.18.200.3", "--profile", "admin"], "unknown_profile"),
        (["allow", "198.18.200.3", "--ttl", "5"], "invalid_ttl"),
        (["allow", "198.18.200.3", "198.18.200.3"], "duplicate_entry"),
        (["revoke", "198.18.200.300"], "invalid_address"),
    ],
)
def test_refusals_name_the_reason_and_change_nothing(
    rig: AgentRig, args: list[str], reason: str
) -> None:
    before = as_json(cli(rig, "list", "--json"))
    refused = as_json(cli(rig, *args, "--json"), REFUSED)
    assert refused["error"]["reason"] == reason
    human = cli(rig, *args)
    assert human.returncode == REFUSED
    assert reason in human.stderr
    after = as_json(cli(rig, "list", "--json"))
    assert (after["state_version"], after["entries"]) == (
        before["state_version"],
        before["entries"],
    )


# --- audit ----------------------------------------------------------------------------------


def test_audit_finds_who_changed_what_by_request_subject_and_address(rig: AgentRig) -> None:
    remote = rig.client().allow([Entry("2001:db8:a0d1::1", subject="carol")])
    local = as_json(cli(rig, "revoke", "--subject", "carol", "--json"))
    (by_request,) = as_json(cli(rig, "audit", "--request-id", remote.request_id, "--json"))["rows"]
    assert (by_request["action"], by_request["address"], by_request["subject"]) == (
        "added",
        "2001:db8:a0d1::/64",  # this agent keys IPv6 sources by their /64
        "carol",
    )
    identity = rig.agent.identity()
    assert by_request["keyid"] == identity.keyid
    assert by_request["caller"] == CONTROL_PLANE
    # Any address of the /64, as a sysadmin may type it, finds the rows the audit wrote.
    rows = as_json(cli(rig, "audit", "--address", "2001:DB8:A0D1:0::77", "--json"))["rows"]
    assert [(r["action"], r["request_id"]) for r in rows] == [
        ("added", remote.request_id),
        ("removed", local["request_id"]),
    ]
    assert rows[1]["caller"] == "local:uid=0(root)"
    assert as_json(cli(rig, "audit", "--subject", "carol", "--limit", "1", "--json"))["rows"] == [
        rows[1]
    ]
    human = cli(rig, "audit", "--subject", "carol")
    assert human.returncode == OK, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "ACTION", "ADDRESS"]
    assert [ln.split()[1] for ln in lines[1:-1]] == ["added", "removed"]
    assert lines[-1] == "2 audit rows"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--address", "198.18.200.300"], "invalid_address"),
        (["--limit", "1001"], "bad_request"),
        (["--limit", "-1"], "bad_request"),
    ],
)
def test_audit_refuses_a_bad_filter_by_name(rig: AgentRig, args: list[str], reason: str) -> None:
    refused = as_json(cli(rig, "audit", *args, "--json"), REFUSED)
    assert refused["error"]["reason"] == reason


# --- why ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "port", "admission", "code"),
    [
        ("198.18.201.1", "5060/udp", "allowed", OK),
        ("2001:db8:77:1::abcd", "5061/tcp", "allowed", OK),  # the /64 entry admits it
        ("198.19.5.77", "5060/udp", "static", OK),
        ("198.18.201.2", "5060/udp", "dropped", NOT_ADMITTED),
        ("198.18.201.2", "80/tcp", "unprotected", OK),
        ("198.18.201.2", "10000/udp", "unprotected", OK),
    ],
)
def test_why_answers_from_the_kernel(
    rig: AgentRig, address: str, port: str, admission: str, code: int
) -> None:
    as_json(cli(rig, "allow", "198.18.201.1", "2001:db8:77:1::1", "--json"))
    try:
        answer = as_json(cli(rig, "why", address, port, "--json"), code)
        assert answer["agent"]["admission"] == admission
        assert answer["other_chains"] == []
        human = cli(rig, "why", address, port)
        assert human.returncode == code
        assert f"({admission})" in human.stdout
    finally:
        as_json(cli(rig, "revoke", "198.18.201.1", "2001:db8:77:1::", "--json"))


def test_why_agrees_with_real_packets(rig: AgentRig, module_lab: Lab) -> None:
    src = module_lab.addr.client(4)
    dropped = as_json(cli(rig, "why", src, "5060/udp", "--json"), NOT_ADMITTED)
    assert dropped["agent"]["admission"] == "dropped"
    assert not module_lab.reaches("udp", 5060, family=4)
    as_json(cli(rig, "allow", src, "--json"))
    try:
        allowed = as_json(cli(rig, "why", src, "5060/udp", "--json"))
        assert allowed["agent"]["state_entry"]["source"] == "local"
        assert module_lab.reaches("udp", 5060, family=4)
    finally:
        as_json(cli(rig, "revoke", src, "--json"))


# --- doctor -----------------------------------------------------------------------------------


def test_doctor_is_content_then_detects_a_shadowing_table(rig: AgentRig, module_lab: Lab) -> None:
    healthy = as_json(cli(rig, "doctor", "--json"))
    levels = {c["name"]: c["level"] for c in healthy["checks"]}
    for name in (
        "daemon",
        "config",
        "kernel",
        "table",
        "shadowing",
        "state directory",
        "state database",
        "server certificate",
        "client CA",
        "clock",
    ):
        assert levels[name] in ("ok", "info"), healthy
    src = module_lab.addr.client(4)
    as_json(cli(rig, "allow", src, "--json"))
    module_lab.srv.nft_script(
        "add table ip filter\n"
        "add chain ip filter input { type filter hook input priority 0; policy drop; }\n"
    )
    try:
        sick = as_json(cli(rig, "doctor", "--json"), PROBLEMS)
        (shadow,) = [c for c in sick["checks"] if c["name"] == "shadowing"]
        assert shadow["level"] == "problem"
        assert "ip filter chain input" in shadow["summary"]
        human = cli(rig, "doctor")
        assert human.returncode == PROBLEMS
        assert "FAIL] shadowing" in human.stdout
        # why: the agent admits the allowed source, the other table still drops it.
        answer = as_json(cli(rig, "why", src, "5060/udp", "--json"), NOT_ADMITTED)
        assert answer["agent"]["admission"] == "allowed"
        assert [(c["chain"], c["outcome"]) for c in answer["other_chains"]] == [
            ("ip filter input", "drops")
        ]
        assert not module_lab.reaches("udp", 5060, family=4)
    finally:
        module_lab.srv.nft("delete", "table", "ip", "filter")
        as_json(cli(rig, "revoke", src, "--json"))


def test_doctor_without_the_daemon_checks_files_and_says_it_is_unreachable(
    rig: AgentRig, socket_dir: Path
) -> None:
    done = cli(rig, "doctor", "--json", socket=socket_dir / "absent.sock")
    report = as_json(done, PROBLEMS)
    levels = {c["name"]: c["level"] for c in report["checks"]}
    assert levels["daemon"] == "problem"
    assert levels["config"] == "ok"
    assert levels["state directory"] == "ok"
    assert levels["server certificate"] == "ok"
    assert "kernel" not in levels
    for command in (["status"], ["list"], ["allow", "198.18.200.5"]):
        assert cli(rig, *command, socket=socket_dir / "absent.sock").returncode == UNREACHABLE


# --- who may use the socket -------------------------------------------------------------------


def test_the_socket_is_0660_root_and_the_configured_group(rig: AgentRig) -> None:
    st = os.stat(_socket(rig))
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, 65534)


def test_a_group_member_may_use_it_and_is_recorded_as_such(rig: AgentRig) -> None:
    status = as_json(cli(rig, "status", "--json", user=NOBODY))
    assert status["agent_id"] == rig.agent.agent_id
    result = as_json(cli(rig, "allow", "198.18.202.1", "--json", user=NOBODY))
    try:
        assert result["results"][0]["status"] == "ADDED"
        assert entries(rig)["198.18.202.1"]["source"] == "local"
    finally:
        as_json(cli(rig, "revoke", "198.18.202.1", "--json"))


def test_only_root_reads_the_audit_log(rig: AgentRig) -> None:
    refused = as_json(cli(rig, "audit", "--json", user=NOBODY), REFUSED)
    assert refused["error"]["reason"] == "local_root_only"
    assert as_json(cli(rig, "audit", "--limit", "1", "--json"))["rows"]


def test_a_non_member_is_refused_by_the_file_mode_and_by_the_daemon(rig: AgentRig) -> None:
    refused = as_json(cli(rig, "status", "--json", user=OUTSIDER), UNREACHABLE)
    assert "permission denied" in refused["error"]["detail"]
    before = as_json(cli(rig, "list", "--json"))
    os.chmod(_socket(rig), 0o666)  # noqa: S103 - a careless chmod: the daemon still checks the peer
    try:
        denied = as_json(cli(rig, "allow", "198.18.202.2", "--json", user=OUTSIDER), REFUSED)
        assert denied["error"]["reason"] == "local_peer_not_allowed"
        assert denied["error"]["code"] == "PERMISSION_DENIED"
    finally:
        os.chmod(_socket(rig), 0o660)
    after = as_json(cli(rig, "list", "--json"))
    assert (after["state_version"], after["entries"]) == (
        before["state_version"],
        before["entries"],
    )


def test_rate_limit_refuses_the_next_change_from_the_same_peer(
    module_lab: Lab, tmp_path: Path, socket_dir: Path
) -> None:
    # A daemon of its own (another table and ports in the same namespace) with a small burst,
    # so no other test's changes count and the minimum refill (1/min) cannot blur the count.
    sock = socket_dir / "rate.sock"
    extra = f'[local]\nsocket = "{sock}"\nrate_limit_per_minute = 1\nrate_limit_burst = 3\n'
    with AgentRig.running(
        module_lab,
        tmp_path / "rate",
        table="vfrate",
        api_listen="127.0.0.1:7444",
        metrics_listen="127.0.0.1:9618",
        extra_toml=extra,
    ) as rated:
        outcomes = []
        for i in range(4):
            done = cli(rated, "revoke", f"198.18.203.{i + 1}", "--json", socket=sock)
            outcomes.append(done.returncode)
        assert outcomes == [OK, OK, OK, REFUSED]
        refused = as_json(cli(rated, "allow", "198.18.203.9", "--json", socket=sock), REFUSED)
        assert refused["error"]["reason"] == "rate_limited"
        assert refused["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert as_json(cli(rated, "list", "--json", socket=sock))["entries"] == []
        # Reads are not limited (per-peer buckets: tests/unit/test_admin.py).
        assert cli(rated, "status", socket=sock).returncode == OK
    # A stopped daemon leaves its table in place; this one's must not confuse later tests.
    module_lab.srv.nft("delete", "table", "inet", "vfrate")
