"""Replay protection and per-address ordering, end to end (PROTOCOL.md "Request header").

Same request id and bytes: the original ``ApplyResult`` and no second change. Same id, other
bytes: ``ALREADY_EXISTS``. Both survive a daemon restart. An operation older than the last one
applied to its address is ``STALE`` and changes nothing; a Sync not newer than the last applied
Sync is ``FAILED_PRECONDITION``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AgentRig
from e2ekit import C, RawCaller, Signer, allow_entry, envelope, now_ms, signed
from netlab import Lab, wait_until

from agent.devlab import DevAgent
from agent.rpc.envelope import payload_type_for
from agent.rpc.pb import agent_pb2

ALLOW_TYPE = payload_type_for(agent_pb2.AllowRequest)
S = agent_pb2.Status


@pytest.fixture(scope="module")
def rig(shared: AgentRig) -> AgentRig:
    return shared


def _allow_env(
    raw: RawCaller, *addresses: str, subject: str = "", **hdr: object
) -> agent_pb2.SignedEnvelope:
    msg = agent_pb2.AllowRequest(
        header=raw.header(**hdr), entries=[allow_entry(a, 600, subject) for a in addresses]
    )
    return signed(msg, raw.signer)


def _statuses(result: agent_pb2.ApplyResult | None) -> list[tuple[str, int]]:
    assert result is not None
    return [(r.address, r.status) for r in result.results]


# --- replay ----------------------------------------------------------------------------------


def test_same_bytes_return_the_original_result_and_change_nothing(rig: AgentRig) -> None:
    env = _allow_env(rig.raw, "198.18.10.1", subject="alice")
    first = rig.raw.send("Allow", env)
    first.applied()
    moved = rig.raw.allow(allow_entry("198.18.10.2"))  # the version moves on meanwhile
    assert moved.ok, moved.message
    before = rig.observe()
    again = rig.raw.send("Allow", env)
    again.applied()
    assert again.result == first.result
    assert again.result.state_version < before.state_version  # the original, not the current
    assert rig.observe() == before


def test_same_payload_under_another_signature_is_the_same_request(rig: AgentRig) -> None:
    env = _allow_env(rig.raw, "198.18.10.3")
    first = rig.raw.send("Allow", env)
    assert first.ok, first.message
    before = rig.observe()
    resigned = envelope(env.payload, ALLOW_TYPE, [Signer.fresh(), rig.raw.signer])
    again = rig.raw.send("Allow", resigned)
    assert again.applied() == first.result
    assert rig.observe() == before


@pytest.mark.parametrize("rpc", ["Revoke", "Erase"])
def test_replayed_revoke_and_erase_change_nothing_the_second_time(rig: AgentRig, rpc: str) -> None:
    address = {"Revoke": "198.18.10.4", "Erase": "198.18.10.5"}[rpc]
    subject = f"replay-{rpc.lower()}"
    assert rig.raw.allow(allow_entry(address, 600, subject)).ok
    if rpc == "Revoke":
        msg: agent_pb2.RevokeRequest | agent_pb2.EraseRequest = agent_pb2.RevokeRequest(
            header=rig.raw.header(), addresses=[address]
        )
    else:
        msg = agent_pb2.EraseRequest(header=rig.raw.header(), subject=subject)
    env = signed(msg, rig.raw.signer)
    first = rig.raw.send(rpc, env)
    first.applied()
    assert address not in rig.observe().elements
    assert rig.raw.allow(allow_entry(address, 600, subject)).ok  # granted again meanwhile
    before = rig.observe()
    again = rig.raw.send(rpc, env)
    again.applied()
    assert again.result.request_id == first.result.request_id
    assert again.result.state_version == first.result.state_version
    assert rig.observe() == before  # the new grant was not revoked by the replay
    assert address in before.elements


def _reused(raw: RawCaller, request_id: str) -> dict[str, tuple[str, agent_pb2.SignedEnvelope]]:
    def hdr() -> agent_pb2.RequestHeader:
        return raw.header(request_id=request_id)

    return {
        "another address": ("Allow", _allow_env(raw, "198.18.10.7", request_id=request_id)),
        "another ttl": (
            "Allow",
            signed(
                agent_pb2.AllowRequest(header=hdr(), entries=[allow_entry("198.18.10.6", 601)]),
                raw.signer,
            ),
        ),
        "another rpc": (
            "Revoke",
            signed(agent_pb2.RevokeRequest(header=hdr(), addresses=["198.18.10.6"]), raw.signer),
        ),
        "invalid fields (replay is judged before them)": (
            "Allow",
            signed(
                agent_pb2.AllowRequest(header=hdr(), entries=[allow_entry("0.0.0.0/0", 1)]),
                raw.signer,
            ),
        ),
        "a Sync": ("Sync", signed(agent_pb2.SyncRequest(header=hdr()), raw.signer)),
    }  # fmt: skip


def test_same_request_id_with_other_bytes_is_already_exists(rig: AgentRig) -> None:
    request_id = rig.raw.request_id("reused")
    original = rig.raw.send("Allow", _allow_env(rig.raw, "198.18.10.6", request_id=request_id))
    assert original.ok, original.message
    before = rig.observe()
    for what, (rpc, env) in _reused(rig.raw, request_id).items():
        answer = rig.raw.send(rpc, env)
        assert (answer.code, answer.reason) == (C.ALREADY_EXISTS, "request_id_reused"), what
    assert rig.observe() == before


def test_a_refused_request_does_not_use_up_its_id(rig: AgentRig) -> None:
    request_id = rig.raw.request_id("retry")
    refused = rig.raw.allow(allow_entry("198.18.10.8", 1), request_id=request_id)
    assert (refused.code, refused.reason) == (C.INVALID_ARGUMENT, "invalid_ttl")
    fixed = rig.raw.allow(allow_entry("198.18.10.8", 600), request_id=request_id)
    assert fixed.ok, fixed.message
    assert _statuses(fixed.result) == [("198.18.10.8", S.ADDED)]


def _short_window(dev: DevAgent) -> None:
    dev.write_config(dev.config_text() + "\n[signing]\nclock_skew_s = 0\nmax_window_s = 2\n")


@pytest.fixture
def fresh(lab: Lab, tmp_path: Path) -> Iterator[AgentRig]:
    with AgentRig.running(lab, tmp_path / "fresh") as rig:
        yield rig


def test_replay_is_recognised_after_a_restart(fresh: AgentRig) -> None:
    raw = fresh.raw
    env = _allow_env(raw, "198.18.11.1", subject="alice")
    first = raw.send("Allow", env)
    assert first.ok, first.message
    request_id = raw.header().request_id
    revoked = raw.revoke(["198.18.11.2"], request_id=request_id)  # NOT_FOUND, but remembered
    assert revoked.ok, revoked.message
    before = fresh.observe()

    fresh.restart()

    assert fresh.observe() == before
    again = fresh.raw.send("Allow", env)
    assert again.applied() == first.result
    other = fresh.raw.send("Allow", _allow_env(fresh.raw, "198.18.11.3", request_id=request_id))
    assert (other.code, other.reason) == (C.ALREADY_EXISTS, "request_id_reused")
    # Ordering memory survived too: an Allow older than the revoke does not resurrect it.
    older = fresh.raw.allow(allow_entry("198.18.11.2"), issued_ms=now_ms() - 20_000)
    assert _statuses(older.result) == [("198.18.11.2", S.STALE)]
    assert fresh.observe() == before


def test_a_replay_gets_its_original_answer_even_if_it_would_no_longer_validate(
    fresh: AgentRig,
) -> None:
    # PROTOCOL.md: replay is checked before field validation.
    env = _allow_env(fresh.raw, "198.18.11.5", subject="alice")  # 600 s
    first = fresh.raw.send("Allow", env)
    assert first.ok, first.message
    request_id = agent_pb2.AllowRequest.FromString(env.payload).header.request_id
    fresh.agent.write_config(fresh.agent.config_text() + "\n[ttl]\nmax = 300\ndefault = 300\n")
    fresh.restart()
    before = fresh.observe()
    again = fresh.raw.send("Allow", env)
    assert again.applied() == first.result
    invalid_now = fresh.raw.send(
        "Allow", _allow_env(fresh.raw, "198.18.11.6", request_id=request_id)
    )
    assert (invalid_now.code, invalid_now.reason) == (C.ALREADY_EXISTS, "request_id_reused")
    fresh_id = fresh.raw.send("Allow", _allow_env(fresh.raw, "198.18.11.6"))
    assert (fresh_id.code, fresh_id.reason) == (C.INVALID_ARGUMENT, "invalid_ttl")
    assert fresh.observe() == before


def test_a_replay_after_its_window_is_simply_expired(lab: Lab, tmp_path: Path) -> None:
    with AgentRig.running(lab, tmp_path / "short", configure=_short_window) as rig:
        env = _allow_env(rig.raw, "198.18.11.4", valid_ms=1000)
        first = rig.raw.send("Allow", env)
        assert first.ok, first.message
        before = rig.observe()
        answers: list[tuple[C, str]] = []

        def expired() -> bool:
            answer = rig.raw.send("Allow", env)
            answers.append((answer.code, answer.reason))
            if answer.ok:
                assert answer.result == first.result
            return not answer.ok

        wait_until(expired, timeout=10, what="the replayed request to expire")
        assert answers[-1] == (C.UNAUTHENTICATED, "request_expired")
        assert rig.observe() == before


# --- ordering ------------------------------------------------------------------------------


def test_an_older_allow_is_stale_and_changes_nothing(rig: AgentRig) -> None:
    t = now_ms()
    assert rig.raw.allow(allow_entry("198.18.12.1", 600, "new"), issued_ms=t).ok
    before = rig.observe()
    older = rig.raw.allow(allow_entry("198.18.12.1", 1200, "old"), issued_ms=t - 10_000)
    assert older.ok, older.message
    assert older.result is not None
    (result,) = older.result.results
    assert (result.status, result.reason) == (S.STALE, "stale_request")
    assert older.result.state_version == before.state_version
    assert rig.observe() == before


def test_an_older_revoke_is_stale_and_the_entry_stays(rig: AgentRig) -> None:
    t = now_ms()
    assert rig.raw.allow(allow_entry("198.18.12.2"), issued_ms=t).ok
    before = rig.observe()
    older = rig.raw.revoke(["198.18.12.2"], issued_ms=t - 1)
    assert _statuses(older.result) == [("198.18.12.2", S.STALE)]
    assert rig.observe() == before
    assert "198.18.12.2" in before.elements


@pytest.mark.parametrize("existed", [True, False], ids=["revoked entry", "never granted"])
def test_a_delayed_older_allow_cannot_resurrect_a_revoked_address(
    rig: AgentRig, existed: bool
) -> None:
    address = "198.18.12.3" if existed else "198.18.12.4"
    t = now_ms()
    if existed:
        assert rig.raw.allow(allow_entry(address), issued_ms=t - 20_000).ok
    revoked = rig.raw.revoke([address], issued_ms=t)
    assert _statuses(revoked.result) == [(address, S.REMOVED if existed else S.NOT_FOUND)]
    before = rig.observe()
    delayed = rig.raw.allow(allow_entry(address), issued_ms=t - 5_000)
    assert _statuses(delayed.result) == [(address, S.STALE)]
    assert rig.observe() == before
    assert address not in before.elements


def test_a_partly_stale_allow_applies_only_the_fresh_entry(rig: AgentRig) -> None:
    t = now_ms()
    assert rig.raw.allow(allow_entry("198.18.12.5"), issued_ms=t).ok
    before = rig.observe()
    mixed = rig.raw.allow(allow_entry("198.18.12.5"), allow_entry("198.18.12.6"),
                          issued_ms=t - 1_000)  # fmt: skip
    assert _statuses(mixed.result) == [("198.18.12.5", S.STALE), ("198.18.12.6", S.ADDED)]
    after = rig.observe()
    assert after.state_version == before.state_version + 1
    assert after.elements == before.elements | {"198.18.12.6"}


def test_state_version_moves_by_one_per_changed_entry(rig: AgentRig) -> None:
    before = rig.observe()
    three = rig.raw.allow(*(allow_entry(f"198.18.13.{i}") for i in (1, 2, 3)))
    three.applied()
    assert three.result.state_version == before.state_version + 3
    assert rig.observe().state_version == before.state_version + 3


# --- Sync ordering (each on a daemon of its own: a Sync replaces every dynamic entry) ---------


def test_a_sync_not_newer_than_the_last_applied_sync_is_refused(fresh: AgentRig) -> None:
    raw = fresh.raw
    t = now_ms()
    synced = raw.sync(allow_entry("198.18.14.1"), issued_ms=t)
    assert synced.ok, synced.message
    before = fresh.observe()
    for issued in (t - 1, t):
        stale = raw.sync(allow_entry("198.18.14.2"), issued_ms=issued)
        assert (stale.code, stale.reason) == (C.FAILED_PRECONDITION, "stale_sync")
        empty = raw.sync(issued_ms=issued)
        assert (empty.code, empty.reason) == (C.FAILED_PRECONDITION, "stale_sync")
    assert fresh.observe() == before
    assert before.elements == {"198.18.14.1"}


def test_a_sync_leaves_entries_changed_after_it_as_they_are(fresh: AgentRig) -> None:
    raw = fresh.raw
    t = now_ms()
    assert raw.allow(allow_entry("198.18.14.3"), allow_entry("198.18.14.4"), issued_ms=t).ok
    assert raw.allow(allow_entry("198.18.14.9"), issued_ms=t - 30_000).ok
    before = fresh.observe()
    sync = raw.sync(allow_entry("198.18.14.3"), allow_entry("198.18.14.5"), issued_ms=t - 10_000)
    assert sync.ok, sync.message
    assert sorted(_statuses(sync.result)) == [
        ("198.18.14.3", S.STALE),  # in the Sync, but allowed after it: not refreshed
        ("198.18.14.4", S.STALE),  # not in the Sync, but allowed after it: kept
        ("198.18.14.5", S.ADDED),
        ("198.18.14.9", S.REMOVED),  # older than the Sync and not in it
    ]
    after = fresh.observe()
    assert after.elements == {"198.18.14.3", "198.18.14.4", "198.18.14.5"}
    assert after.state_version == before.state_version + 2
    kept = {k for k in before.kernel if k[1] in {"198.18.14.3", "198.18.14.4"}}
    assert kept <= after.kernel  # untouched: same timeout and comment (request id)


def test_an_operation_issued_before_the_last_sync_is_stale_everywhere_after_a_restart(
    fresh: AgentRig,
) -> None:
    """The Sync orders every address, named or not, and that survives a restart."""
    t = now_ms()
    assert fresh.raw.sync(allow_entry("198.18.14.6"), issued_ms=t).ok
    fresh.restart()
    raw = fresh.raw
    before = fresh.observe()
    late = raw.allow(allow_entry("198.18.14.6"), allow_entry("198.18.14.7"), issued_ms=t - 1)
    assert _statuses(late.result) == [("198.18.14.6", S.STALE), ("198.18.14.7", S.STALE)]
    revoke = raw.revoke(["198.18.14.6"], issued_ms=t - 1)
    assert _statuses(revoke.result) == [("198.18.14.6", S.STALE)]
    assert fresh.observe() == before
    newer = raw.allow(allow_entry("198.18.14.7"), issued_ms=t + 1)
    assert _statuses(newer.result) == [("198.18.14.7", S.ADDED)]
