"""``vicifast-agent ctl`` without an agent: settings, input files, output, errors, exit codes.

The calls themselves are proven end to end in tests/e2e/test_ctl.py; here is everything the CLI
decides on its own. Reason words are matched, never message text.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from agent.__main__ import main
from agent.cli import build_parser
from agent.ctl import CtlError, Exit
from agent.ctl.commands import _Pinned, call_failure
from agent.ctl.connection import Connection, connection_file_text, resolve_connection
from agent.ctl.entries import parse_sync_entries
from agent.ctl.output import format_apply_result, format_event, format_state, to_json, when
from agent.devpki import DevMaterial, make_dev_pki
from agent.rpc.client import AgentCallError, AgentClient, Entry
from agent.rpc.pb import agent_pb2 as pb
from agent.rpc.signing import keyid_for, private_key_from_pem

NOW = 1_700_000_000_000  # 2023-11-14T22:13:20Z
BASE = {"target": "t:1", "agent_id": "a", "ca": "/ca", "cert": "/c", "key": "/k"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevMaterial:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), "dialer-01")


def refused(call: object, *args: object, **kwargs: object) -> CtlError:
    with pytest.raises(CtlError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


# --- connection settings: command line, then environment, then file ---------------------------


def env(**values: str) -> dict[str, str]:
    return {f"VICIFAST_CTL_{k.upper()}": v for k, v in values.items()}


def test_command_line_beats_environment_beats_file(tmp_path: Path) -> None:
    file = tmp_path / "conn.toml"
    file.write_text(
        connection_file_text({**BASE, "target": "file:1", "agent_id": "file", "timeout": "7"})
    )
    got = resolve_connection(
        {"target": "cli:1"},
        env(target="env:1", agent_id="env", connection=str(file)),
        connection_file=None,
    )
    assert (got.target, got.agent_id, got.timeout_s) == ("cli:1", "env", 7.0)


def test_connection_file_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    file = tmp_path / "sub" / "conn.toml"
    file.parent.mkdir()
    file.write_text(
        connection_file_text({**BASE, "ca": "ca.crt", "signing_key": "/abs/signing.key"})
    )
    got = resolve_connection({}, {}, connection_file=str(file))
    assert got.ca == file.parent / "ca.crt"
    assert got.signing_key == Path("/abs/signing.key")


def test_connection_file_accepts_a_numeric_timeout(tmp_path: Path) -> None:
    file = tmp_path / "conn.toml"
    file.write_text(connection_file_text(BASE) + "timeout = 2.5\n")
    assert resolve_connection({}, {}, connection_file=str(file)).timeout_s == 2.5


@pytest.mark.parametrize("missing", ["target", "agent_id", "ca", "cert", "key"])
def test_a_missing_required_setting_is_named(missing: str) -> None:
    options = {k: v for k, v in BASE.items() if k != missing}
    err = refused(resolve_connection, options, {}, connection_file=None)
    assert err.reason == "missing_setting"
    assert err.exit_code == Exit.USAGE
    assert f"--{missing.replace('_', '-')}" in err.detail


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('target = "x"\nport = 1\n', "bad_connection_file"),  # unknown key
        ("target = 5\n", "bad_connection_file"),  # not a string
        ("target = \n", "bad_connection_file"),  # not TOML
    ],
)
def test_a_bad_connection_file_is_refused(tmp_path: Path, text: str, reason: str) -> None:
    file = tmp_path / "conn.toml"
    file.write_text(text)
    assert refused(resolve_connection, {}, {}, connection_file=str(file)).reason == reason


@pytest.mark.parametrize("timeout", ["soon", "0", "-1"])
def test_a_bad_timeout_is_refused(timeout: str) -> None:
    err = refused(resolve_connection, {**BASE, "timeout": timeout}, {}, connection_file=None)
    assert err.reason == "bad_setting"


def test_an_unreadable_connection_file_is_a_usage_error(tmp_path: Path) -> None:
    err = refused(resolve_connection, {}, {}, connection_file=str(tmp_path / "absent.toml"))
    assert (err.reason, err.exit_code) == ("unreadable_file", Exit.USAGE)


def test_signing_commands_need_the_signing_key_and_reads_do_not(pki: DevMaterial) -> None:
    conn = Connection("t:1", "a", pki.ca_cert, pki.client.cert, pki.client.key)
    assert conn.identity(signing=False).client_cert == pki.client.cert.read_bytes()
    assert refused(conn.identity, signing=True).reason == "missing_setting"


def test_the_key_id_defaults_to_the_signing_keys_own(pki: DevMaterial) -> None:
    conn = Connection(
        "t:1", "a", pki.ca_cert, pki.client.cert, pki.client.key, signing_key=pki.signing.key
    )
    identity = conn.identity(signing=True)
    assert identity.keyid == pki.signing.keyid == keyid_for(identity.signing_key.public_key())


@pytest.mark.parametrize(
    ("field", "reason"), [("ca", "unreadable_file"), ("signing_key", "bad_signing_key")]
)
def test_unusable_key_material_is_a_usage_error(
    pki: DevMaterial, tmp_path: Path, field: str, reason: str
) -> None:
    bogus = tmp_path / "bogus.pem"
    if field == "signing_key":
        bogus.write_bytes(pki.client.key.read_bytes())  # an ECDSA key, not Ed25519
    settings = {
        "target": "t:1",
        "agent_id": "a",
        "ca": pki.ca_cert,
        "cert": pki.client.cert,
        "key": pki.client.key,
        "signing_key": pki.signing.key,
        field: bogus,
    }
    err = refused(Connection(**settings).identity, signing=True)  # type: ignore[arg-type]
    assert (err.reason, err.exit_code) == (reason, Exit.USAGE)


# --- argument parsing ---------------------------------------------------------------------------


def parse(*argv: str) -> dict[str, object]:
    return vars(build_parser().parse_args(list(argv)))


def test_connection_options_go_before_or_after_the_command() -> None:
    before = parse("ctl", "--target", "h:1", "--json", "state")
    after = parse("ctl", "state", "--target", "h:1", "--json")
    for args in (before, after):
        assert (args["target"], args["json"]) == ("h:1", True)


def test_an_option_before_the_command_survives_the_commands_defaults() -> None:
    args = parse("ctl", "--agent-id", "x", "allow", "198.18.0.2")
    assert args["agent_id"] == "x"
    assert "target" not in args  # unset stays unset, so the environment can fill it


def test_allow_arguments() -> None:
    args = parse(
        "ctl", "allow", "198.18.0.2", "2001:db8::1", "--ttl", "600", "--subject", "al",
        "--profile", "agent", "--request-id", "abcdefgh", "--issued-at", "5",
    )  # fmt: skip
    assert args["addresses"] == ["198.18.0.2", "2001:db8::1"]
    assert (args["ttl"], args["subject"], args["port_profile"]) == (600, "al", "agent")
    assert (args["request_id"], args["issued_at"]) == ("abcdefgh", 5)


def test_allow_defaults_leave_ttl_subject_and_profile_to_the_agent() -> None:
    args = parse("ctl", "allow", "198.18.0.2")
    assert (args["ttl"], args["subject"], args["port_profile"]) == (0, "", "")
    assert (args["request_id"], args["issued_at"]) == (None, None)


@pytest.mark.parametrize(
    "argv",
    [
        ["ctl", "allow"],  # no address
        ["ctl", "allow", "198.18.0.2", "--ttl", "ten"],
        ["ctl", "allow", "198.18.0.2", "--ttl", "-1"],  # the field is a uint32
        ["ctl", "allow", "198.18.0.2", "--ttl", str(2**32)],
        ["ctl", "allow", "198.18.0.2", "--issued-at", "-5"],
        ["ctl", "watch", "--count", "x"],
        ["ctl", "watch", "--count", "0"],
        ["ctl", "watch", "--since", "-1"],
        ["ctl", "sync", "f", "--format", "xml"],
        ["ctl", "erase"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == Exit.USAGE


@pytest.mark.parametrize(
    "argv",
    [
        ["ctl", "revoke"],  # neither addresses nor subject
        ["ctl", "revoke", "198.18.0.2", "--subject", "bob"],  # both
        ["ctl", "erase", ""],
    ],
)
def test_requests_the_agent_would_refuse_anyway_stop_here_with_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--target", "127.0.0.1:1"]) == Exit.USAGE
    assert capsys.readouterr().err.startswith("vicifast-agent: error: bad_arguments")


def test_an_empty_sync_needs_allow_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "none.jsonl"
    empty.write_text("\n")
    assert main(["ctl", "sync", str(empty), "--target", "127.0.0.1:1"]) == Exit.USAGE
    assert capsys.readouterr().err.startswith("vicifast-agent: error: empty_sync")


def test_a_missing_setting_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VICIFAST_CTL_TARGET", raising=False)
    monkeypatch.delenv("VICIFAST_CTL_CONNECTION", raising=False)
    assert main(["ctl", "state"]) == Exit.USAGE
    assert capsys.readouterr().err.startswith("vicifast-agent: error: missing_setting: target")


def test_ctl_without_a_command_prints_help_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["ctl"]) == Exit.USAGE
    assert "allow" in capsys.readouterr().out


# --- sync input ---------------------------------------------------------------------------------

JSONL = """\
{"address": "198.18.0.2", "ttl_seconds": 600, "subject": "alice", "profile": "agent"}

{"address": "2001:db8::5"}
"""
CSV = (
    "address,ttl_seconds,subject,profile\n"
    "198.18.0.2,600,alice,agent\n"
    "2001:db8::5,,,\n"
    '"x, y",,"o\'brien, ""bob""",\n'
)
EXPECTED = [Entry("198.18.0.2", 600, "alice", "agent"), Entry("2001:db8::5")]


def test_sync_input_as_json_lines() -> None:
    assert parse_sync_entries(JSONL, "jsonl") == EXPECTED


def test_sync_input_as_csv_with_quoting() -> None:
    got = parse_sync_entries(CSV, "csv")
    assert got == [*EXPECTED, Entry("x, y", 0, 'o\'brien, "bob"')]


def test_csv_columns_may_come_in_any_order_and_be_left_out() -> None:
    assert parse_sync_entries("subject,address\nal,198.18.0.2\n", "csv") == [
        Entry("198.18.0.2", 0, "al")
    ]


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ('{"address": "198.18.0.2", "ttl": 5}', "jsonl"),  # unknown field
        ('{"subject": "x"}', "jsonl"),  # no address
        ('{"address": ""}', "jsonl"),
        ('{"address": "198.18.0.2", "ttl_seconds": -1}', "jsonl"),
        ('{"address": "198.18.0.2", "ttl_seconds": 1.5}', "jsonl"),
        ('{"address": "198.18.0.2", "ttl_seconds": true}', "jsonl"),
        ('{"address": "198.18.0.2", "subject": 5}', "jsonl"),
        ('["198.18.0.2"]', "jsonl"),
        ("198.18.0.2", "jsonl"),  # not JSON
        ("address,ttl\n198.18.0.2,5\n", "csv"),  # unknown column
        ("subject\nalice\n", "csv"),  # no address column
        ("address\n198.18.0.2,extra\n", "csv"),  # more cells than the header
        ("address,ttl_seconds\n198.18.0.2,soon\n", "csv"),
    ],
)
def test_bad_sync_input_is_refused(text: str, fmt: str) -> None:
    assert refused(parse_sync_entries, text, fmt).reason == "bad_input"


# --- output -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "-"),
        (NOW, "2023-11-14T22:13:20Z (now)"),
        (NOW + 599_999, "2023-11-14T22:23:19Z (in 9m 59s)"),
        (NOW + 86_400_000, "2023-11-15T22:13:20Z (in 1d 0h)"),
        (NOW + 90_061_000, "2023-11-15T23:14:21Z (in 1d 1h)"),
        (NOW - 5_000, "2023-11-14T22:13:15Z (5s ago)"),
        (NOW - 3_600_000, "2023-11-14T21:13:20Z (1h 0m ago)"),
    ],
)
def test_times_are_utc_iso_with_a_relative_hint(ms: int, text: str) -> None:
    assert when(ms, NOW) == text


def result() -> pb.ApplyResult:
    return pb.ApplyResult(
        request_id="req-00001",
        state_version=7,
        results=[
            pb.EntryResult(
                address="198.18.0.2", profile="agent", status=pb.ADDED,
                expires_at_unix_ms=NOW + 600_000,
            ),
            pb.EntryResult(address="198.18.0.9", status=pb.NOT_FOUND, reason="absent"),
        ],
    )  # fmt: skip


def test_apply_result_for_humans() -> None:
    assert format_apply_result(result(), NOW).splitlines() == [
        "request req-00001  state_version 7",
        "ADDRESS     PROFILE  STATUS     EXPIRES                           REASON",
        "198.18.0.2  agent    ADDED      2023-11-14T22:23:20Z (in 10m 0s)  -",
        "198.18.0.9  -        NOT_FOUND  -                                 absent",
    ]


def test_erase_result_for_humans_names_erased_records() -> None:
    erased = pb.ApplyResult(request_id="req-00002", state_version=3, erased_records=4)
    assert format_apply_result(erased, NOW, erase=True).splitlines() == [
        "request req-00002  state_version 3  erased_records 4",
        "(no entries)",
    ]


def state(**kw: object) -> pb.AgentState:
    fields: dict[str, object] = {
        "agent_id": "dialer-01",
        "version": "0.1.0",
        "started_at_unix_ms": NOW - 60_000,
        "now_unix_ms": NOW,
        "state_version": 9,
        "ruleset_in_sync": True,
        "last_verified_at_unix_ms": NOW - 2_000,
        "trusted_keyids": ["ed25519:00"],
        "profiles": ["agent"],
        "entries": [
            pb.Entry(
                address="198.18.0.2", profile="agent", subject="al\x1bice",
                created_at_unix_ms=NOW, expires_at_unix_ms=NOW + 60_000, request_id="r1",
            )
        ],
    }  # fmt: skip
    fields.update(kw)
    return pb.AgentState(**fields)  # type: ignore[arg-type]


def test_state_for_humans() -> None:
    assert format_state(state(), NOW).splitlines() == [
        "agent        dialer-01, vicifast-agent 0.1.0, started 2023-11-14T22:12:20Z (1m 0s ago)",
        "ruleset      in sync, verified 2023-11-14T22:13:18Z (2s ago), 0 drift repairs",
        "profiles     agent",
        "trusted keys ed25519:00",
        "state        version 9, 1 entry",
        "",
        "ADDRESS     PROFILE  SUBJECT      EXPIRES                          REQUEST",
        "198.18.0.2  agent    al\\u001bice  2023-11-14T22:14:20Z (in 1m 0s)  r1",
    ]


def test_state_warns_of_drift_and_clock_skew() -> None:
    text = format_state(state(ruleset_in_sync=False, entries=[]), NOW - 5_000)
    assert "NOT IN SYNC" in text
    assert "the agent is 5.0 s ahead of this host" in text
    assert "version 9, 0 entries" in text.splitlines()[-1]


def test_events_for_humans() -> None:
    added = pb.AgentEvent(
        state_version=3,
        at_unix_ms=NOW,
        kind=pb.AgentEvent.ADDED,
        entry=pb.Entry(address="198.18.0.2", profile="agent", expires_at_unix_ms=NOW + 60_000),
    )
    resync = pb.AgentEvent(
        state_version=9, at_unix_ms=NOW, kind=pb.AgentEvent.RESYNC_REQUIRED, detail="gap"
    )
    assert format_event(added, NOW) == (
        "#3  2023-11-14T22:13:20Z  ADDED  198.18.0.2  agent  subject=-"
        "  expires 2023-11-14T22:14:20Z (in 1m 0s)"
    )
    assert format_event(resync, NOW) == "#9  2023-11-14T22:13:20Z  RESYNC_REQUIRED  gap"


def test_json_keeps_proto_names_defaults_enum_names_and_numbers() -> None:
    got = to_json(result())
    assert got["state_version"] == 7
    assert got["erased_records"] == 0
    assert got["results"][0]["status"] == "ADDED"
    assert got["results"][0]["expires_at_unix_ms"] == NOW + 600_000
    assert got["results"][1]["profile"] == ""
    assert json.loads(json.dumps(got)) == got


# --- errors and exit codes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message", "line", "exit_code"),
    [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_ttl: entries[0]: ttl 1",
            "vicifast-agent: error: invalid_ttl: entries[0]: ttl 1 [INVALID_ARGUMENT]",
            Exit.REFUSED,
        ),
        (
            grpc.StatusCode.ALREADY_EXISTS,
            "request_id_reused",
            "vicifast-agent: error: request_id_reused [ALREADY_EXISTS]",
            Exit.REFUSED,
        ),
        # the kernel refused: the agent answered, with a reason word
        (
            grpc.StatusCode.UNAVAILABLE,
            "kernel_refused: ENOMEM",
            "vicifast-agent: error: kernel_refused: ENOMEM [UNAVAILABLE]",
            Exit.REFUSED,
        ),
        # the transport's own words: nobody answered
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: x",
            "vicifast-agent: error: unreachable: failed to connect to all addresses;"
            " last error: x [UNAVAILABLE]",
            Exit.UNREACHABLE,
        ),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "Deadline Exceeded",
            "vicifast-agent: error: no_answer: Deadline Exceeded [DEADLINE_EXCEEDED]",
            Exit.UNREACHABLE,
        ),
        (
            grpc.StatusCode.INTERNAL,
            "Exception calling application",
            "vicifast-agent: error: internal: Exception calling application [INTERNAL]",
            Exit.REFUSED,
        ),
    ],
)
def test_call_errors_become_one_line_and_an_exit_code(
    code: grpc.StatusCode, message: str, line: str, exit_code: Exit
) -> None:
    failure = call_failure(AgentCallError(code, message))
    assert (failure.line(), failure.exit_code) == (line, exit_code)
    assert failure.to_json()["error"]["code"] == code.name


def test_exit_codes_are_distinct() -> None:
    assert len({int(e) for e in Exit}) == len(Exit)
    assert (Exit.USAGE, Exit.REFUSED, Exit.UNREACHABLE) == (2, 3, 4)


@pytest.mark.parametrize(
    "issued_at", [1, 999, NOW, NOW + 1, 1_795_435_667_185, 253_402_300_799_999]
)
def test_a_pinned_request_id_and_issued_at_rebuild_identical_bytes(
    pki: DevMaterial, issued_at: int
) -> None:
    pinned = _Pinned("retry-me-01", issued_at)
    conn = Connection(
        "127.0.0.1:1", "dialer-01", pki.ca_cert, pki.client.cert, pki.client.key,
        signing_key=pki.signing.key,
    )  # fmt: skip
    entries = [Entry("198.18.0.2", 600, "alice")]
    envelopes = []
    for _ in range(2):
        with AgentClient(
            conn.target, conn.agent_id, conn.identity(signing=True), clock=pinned.clock
        ) as client:
            envelopes.append(client.envelope_allow(entries, pinned.request_id))
    assert envelopes[0].SerializeToString() == envelopes[1].SerializeToString()
    request = pb.AllowRequest.FromString(envelopes[0].payload)
    assert request.header.issued_at_unix_ms == issued_at
    assert request.header.request_id == "retry-me-01"
    key = private_key_from_pem(pki.signing.key.read_bytes())
    assert envelopes[0].signatures[0].keyid == keyid_for(key.public_key())
