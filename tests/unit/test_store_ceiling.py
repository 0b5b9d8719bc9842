"""The state_version ceiling beside the database (``agent.store_ceiling``) and the store's
resumption after a lost database (``Store.resume_after_loss``): what a corrupt state.db cannot
take with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.store import Store, StoreError
from agent.store_ceiling import RESERVE, VersionCeiling, ceiling_path
from agent.store_records import CommitBatch


def _commit(store: Store, version: int) -> None:
    store.commit(CommitBatch(state_version=version))


def test_every_committed_version_stays_below_the_recorded_ceiling(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with Store.open(db) as store:
        assert VersionCeiling(db).read() == 0  # nothing committed, nothing recorded
        for version in (1, 2, 3, RESERVE + 1, RESERVE + 5):
            _commit(store, version)
            assert VersionCeiling(db).read() >= version
    # Written ahead, not once per commit: 1 reserved up to 1 + RESERVE, then RESERVE + 5 more.
    assert VersionCeiling(db).read() == RESERVE + 5 + RESERVE


@pytest.mark.parametrize("content", ["", "garbage\n", "-5\n"])
def test_an_unreadable_ceiling_proves_nothing(tmp_path: Path, content: str) -> None:
    db = tmp_path / "state.db"
    ceiling_path(db).write_text(content)
    assert VersionCeiling(db).read() == 0


def test_a_store_resumed_after_a_loss_continues_above_the_lost_one(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with Store.open(db) as store:
        _commit(store, 41)
    db.rename(tmp_path / "state.db.corrupt-1")  # what the daemon does with a damaged one
    with Store.open(db) as fresh:
        assert fresh.state_version() == 0
        version = fresh.resume_after_loss(now_ms=1_800_000_000_000)
        assert version > 41
        assert fresh.state_version() == version
        assert fresh.oldest_retained_version() == version + 1  # no invented history below
        assert fresh.replay_floor_ms() == 1_800_000_000_000
        _commit(fresh, version + 1)
    with Store.open(db) as reopened:  # both survive a restart
        assert reopened.replay_floor_ms() == 1_800_000_000_000
        assert reopened.state_version() == version + 1


def test_a_store_from_before_the_ceiling_gets_one_when_recorded(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with Store.open(db) as store:
        _commit(store, 7)
    ceiling_path(db).unlink()  # as an agent without the ceiling left it
    with Store.open(db) as store:
        store.record_ceiling()
    assert VersionCeiling(db).read() >= 7


def test_a_healthy_store_refuses_no_request(tmp_path: Path) -> None:
    with Store.open(tmp_path / "state.db") as store:
        assert store.replay_floor_ms() == 0


def test_a_ceiling_that_cannot_be_written_fails_the_commit_and_writes_nothing(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    with Store.open(db) as store:
        ceiling_path(db).mkdir()  # the atomic rename onto it fails
        with pytest.raises(StoreError) as failed:
            _commit(store, 1)
        assert failed.value.reason == "store_failed"
        assert store.state_version() == 0
