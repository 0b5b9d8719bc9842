"""One CLI contract for both halves (agent.cli_contract), table-driven over every command.

The sysadmin's commands (local socket) and ``ctl`` (mTLS) exit with the same code for the same
kind of failure and print the same error: one line on stderr, or with ``--json`` one object on
stdout, ``{"error": {"reason", "detail", "code", "exit_code"}}``. Every command's ``--help``
has a description and its exit codes; the README and the man page carry the one table.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.__main__ import main
from agent.cli import build_parser
from agent.cli_contract import EXIT_TABLE, Exit, exit_table_markdown
from agent.errors import ErrorKind
from agent.local.client import LocalClient
from agent.local.wire import LocalCallError
from agent.rpc.client import AgentCallError, AgentClient

REPO = Path(__file__).resolve().parents[2]
ERROR_KEYS = {"reason", "detail", "code", "exit_code"}

# Every command that asks the daemon or an agent, with arguments it accepts.
LOCAL = [
    ["status"],
    ["list"],
    ["allow", "198.18.0.9", "--ttl", "1h"],
    ["revoke", "198.18.0.9"],
    ["revoke", "--subject", "carol"],
    ["why", "198.18.0.9", "5060/udp"],
    ["audit"],
]
CTL = [
    ["ctl", "state"],
    ["ctl", "watch"],
    ["ctl", "allow", "198.18.0.9", "--ttl", "90m"],
    ["ctl", "revoke", "198.18.0.9"],
    ["ctl", "revoke", "--subject", "carol"],
    ["ctl", "erase", "carol"],
    ["ctl", "sync", "{sync_file}"],
]
COMMANDS = LOCAL + CTL


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Dev PKI and a connection file (the real ctl settings), a Sync input, no daemon."""
    d = tmp_path_factory.mktemp("contract")
    assert main(["dev-pki", str(d / "pki"), "--target", "127.0.0.1:1", "--json"]) == 0
    sync = d / "entries.jsonl"
    sync.write_text('{"address": "198.18.0.9", "ttl_seconds": 600}\n')
    return {
        "connection": str(d / "pki" / "ctl.toml"),
        "socket": str(d / "absent.sock"),
        "sync_file": str(sync),
    }


def argv_for(command: list[str], material: dict[str, str], *extra: str) -> list[str]:
    words = [w.format(**material) for w in command]
    if words[0] == "ctl":
        return [*words, "--connection", material["connection"], "--timeout", "5", *extra]
    return [*words, "--socket", material["socket"], "--timeout", "5", *extra]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def json_error(stdout: str) -> dict[str, Any]:
    (line,) = stdout.splitlines()
    body: dict[str, Any] = json.loads(line)
    assert set(body) == {"error"}
    assert set(body["error"]) >= ERROR_KEYS
    return dict(body["error"])


def ids(commands: list[list[str]]) -> list[str]:
    return [" ".join(c[:2]) for c in commands]


# --- the same failure, the same exit code and error, on both halves -------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=ids(COMMANDS))
def test_unreachable_exits_4_with_the_one_error_shape(
    command: list[str], material: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv_for(command, material, "--json"), capsys)
    assert code == Exit.UNREACHABLE == 4
    error = json_error(out)
    assert (error["reason"], error["code"], error["exit_code"]) == ("unreachable", "UNAVAILABLE", 4)
    code, out, err = run(argv_for(command, material), capsys)
    assert code == Exit.UNREACHABLE
    assert out == ""
    assert err.startswith("vicifast-agent: error: unreachable: ")


@pytest.fixture
def refusing_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon and agent both refuse with the same reason: ``invalid_address``."""

    def local_refuses(self: LocalClient, op: str, **args: Any) -> dict[str, Any]:
        raise LocalCallError(ErrorKind.INVALID_ARGUMENT, "invalid_address", "'x': not an address")

    def agent_refuses(self: AgentClient, *args: Any) -> Any:
        raise AgentCallError(
            grpc.StatusCode.INVALID_ARGUMENT, "invalid_address: 'x': not an address"
        )

    def agent_stream_refuses(self: AgentClient, *args: Any) -> Iterator[Any]:
        agent_refuses(self)
        yield None

    monkeypatch.setattr(LocalClient, "call", local_refuses)
    monkeypatch.setattr(AgentClient, "send", agent_refuses)
    monkeypatch.setattr(AgentClient, "state", agent_refuses)
    monkeypatch.setattr(AgentClient, "watch", agent_stream_refuses)


@pytest.mark.parametrize("command", COMMANDS, ids=ids(COMMANDS))
@pytest.mark.usefixtures("refusing_agent")
def test_a_refusal_exits_3_with_the_one_error_shape(
    command: list[str], material: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(argv_for(command, material, "--json"), capsys)
    assert code == Exit.REFUSED == 3
    assert json_error(out) == {
        "reason": "invalid_address",
        "detail": "'x': not an address",
        "code": "INVALID_ARGUMENT",
        "exit_code": 3,
    }
    code, out, err = run(argv_for(command, material), capsys)
    assert code == Exit.REFUSED
    assert out == ""
    assert err == "vicifast-agent: error: invalid_address: 'x': not an address [INVALID_ARGUMENT]\n"


USAGE = [
    ["why", "198.18.0.9", "5060"],  # no /proto
    ["why", "198.18.0.9", "5060/sctp"],
    ["why", "sip.example.com", "5060/udp"],  # a host name
    ["revoke"],  # nothing to revoke
    ["revoke", "198.18.0.9", "--subject", "carol"],
    ["allow"],
    ["allow", "198.18.0.9", "--ttl", "1 hour"],
    ["allow", "198.18.0.9", "--ttl", "-5m"],
    ["list", "--no-such-option"],
    ["audit", "--limit", "many"],
    ["ctl", "revoke"],
    ["ctl", "revoke", "198.18.0.9", "--subject", "carol"],
    ["ctl", "erase", ""],
    ["ctl", "allow", "198.18.0.9", "--ttl", "2x"],
    ["ctl", "allow", "198.18.0.9", "--ttl", "200000d"],  # over uint32 seconds
    ["ctl", "watch", "--count", "0"],
    ["ctl", "sync", "{socket}"],  # unreadable input file
    ["no-such-command"],
]


@pytest.mark.parametrize("command", USAGE, ids=[" ".join(c) for c in USAGE])
def test_usage_errors_exit_2_with_the_one_error_shape(
    command: list[str], material: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = argv_for(command, material) if command[0] != "no-such-command" else command
    code, out, err = run([*argv, "--json"], capsys)
    assert code == Exit.USAGE == 2
    error = json_error(out)
    assert (error["code"], error["exit_code"]) == (None, 2)
    assert error["reason"] in {"usage", "bad_arguments", "unreadable_file"}
    code, out, err = run(argv, capsys)
    assert code == Exit.USAGE
    assert out == ""
    assert "vicifast-agent: error: " in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["why", "sip.example.com", "5060/udp"], "host names are not accepted"),
        (["why", "198.18.0.9", "5060"], "PORT/PROTO such as 5060/udp"),
        (["revoke"], "nothing to revoke"),
        (["revoke", "198.18.0.9", "--subject", "carol"], "not both"),
        (["ctl", "revoke", "--target", "127.0.0.1:1"], "nothing to revoke"),
        (["ctl", "revoke", "198.18.0.9", "--subject", "c", "--target", "127.0.0.1:1"], "not both"),
        (["allow", "198.18.0.9", "--ttl", "1 hour"], "90m, 1h, 2d"),
    ],
)
def test_common_mistakes_get_clear_words(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    where = [] if argv[0] == "ctl" else ["--socket", "/nonexistent"]
    assert main([*argv, *where]) == Exit.USAGE
    err = capsys.readouterr().err
    assert words in err
    if "nothing" in words:
        assert "not both" not in err


# --- the help, the man page and the README carry the one table ------------------------------


def _commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _commands(sub, f"{prefix} {name}")


EVERY_COMMAND = list(_commands(build_parser(), "vicifast-agent"))


@pytest.mark.parametrize(("name", "parser"), EVERY_COMMAND, ids=[n for n, _ in EVERY_COMMAND])
def test_every_command_help_has_a_description_and_its_exit_codes(
    name: str, parser: argparse.ArgumentParser
) -> None:
    assert parser.description, f"{name} --help has no description"
    help_text = parser.format_help()
    assert "exit status" in help_text
    listed = {int(m) for m in re.findall(r"^\s{2,}(\d{1,3})\s{2}\S", parser.epilog or "", re.M)}
    assert Exit.OK in listed
    assert Exit.USAGE in listed or name.endswith(" run"), name
    assert listed <= {int(c) for c in EXIT_TABLE} | {78}, name


def test_the_top_level_help_lists_the_whole_table_and_version_works(
    capsys: pytest.CaptureFixture[str],
) -> None:
    help_text = build_parser().format_help()
    for code in EXIT_TABLE:
        assert re.search(rf"^\s+{int(code)}\s{{2}}", help_text, re.M), code
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert re.fullmatch(r"vicifast-agent \S+\n", capsys.readouterr().out)


def test_the_readme_carries_the_one_table() -> None:
    assert exit_table_markdown() in (REPO / "README.md").read_text()


def test_the_man_page_exit_status_is_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "packaging"))
    import manpage  # noqa: PLC0415 - packaging/ is not a package

    page = manpage.render()
    section = page.split(".SH EXIT STATUS", 1)[1].split(".SH", 1)[0]
    for code in EXIT_TABLE:
        assert re.search(rf"^\.IP {int(code)}$", section, re.M), code


def test_check_config_says_no_with_exit_1_and_the_same_error_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('agent_id = "a"\n[api]\nlisten = "nope"\n')
    code, out, _ = run(["check-config", str(bad), "--json"], capsys)
    assert code == Exit.NO == 1
    answer = json.loads(out)
    assert answer["ok"] is False
    assert set(answer["error"]) >= ERROR_KEYS
    assert (answer["error"]["reason"], answer["error"]["key"]) == ("invalid_config", "api.listen")
    assert answer["error"]["exit_code"] == 1
