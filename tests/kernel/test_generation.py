"""The kernel side of drift detection (``agent.rules.monitor``): the ruleset generation that lets
a clean restart skip listing the elements, and the notifications of the agent's own commits,
which must cost nothing, against a foreign commit, which must be reported."""

from __future__ import annotations

import threading

from netlab import Lab, Netns

from agent.devlab import scratch_netns
from agent.rules.monitor import NftMonitor, Touch, generation, ruleset_fingerprint


def test_the_generation_moves_with_each_commit_and_only_then(lab: Lab) -> None:
    first = lab.srv.call(generation)
    assert lab.srv.call(generation) == first  # reading is no change
    lab.srv.nft("add", "table", "inet", "vf_gen_other")
    after_add = lab.srv.call(generation)
    assert after_add > first
    lab.srv.nft("list", "ruleset")
    assert lab.srv.call(generation) == after_add
    lab.srv.nft("delete", "table", "inet", "vf_gen_other")
    assert lab.srv.call(generation) > after_add


def test_the_fingerprint_names_generation_and_namespace(lab: Lab) -> None:
    first = lab.srv.call(ruleset_fingerprint)
    assert lab.srv.call(ruleset_fingerprint) == first
    lab.srv.nft("add", "table", "inet", "vf_gen_other")
    assert lab.srv.call(ruleset_fingerprint) != first
    with scratch_netns("vf-fp-a") as a, scratch_netns("vf-fp-b") as b:
        ns_a, ns_b = Netns(a), Netns(b)
        assert ns_a.call(generation) == ns_b.call(generation)  # both fresh
        assert ns_a.call(ruleset_fingerprint) != ns_b.call(ruleset_fingerprint)
    lab.srv.nft("delete", "table", "inet", "vf_gen_other")


def _own_commit(lab: Lab, nft: object, script: str) -> None:
    rc, _out, err = nft.cmd(script)  # type: ignore[attr-defined]
    assert rc == 0, err


def test_own_notifications_are_dropped_as_they_arrive_and_foreign_ones_reported(lab: Lab) -> None:
    me = threading.get_native_id()
    monitor = lab.srv.call(NftMonitor, "vf_mon", is_own=lambda tid: tid == me)
    nft = lab.srv.nftables()
    try:
        _own_commit(lab, nft, "add table inet vf_mon; add set inet vf_mon s { type ipv4_addr; }")
        assert monitor.wait(0.5) == Touch()  # own: the NEWGEN names this thread
        assert len(monitor._own_ports) == 1  # and its header our socket's port
        elements = ", ".join(f"198.18.1.{i}" for i in range(1, 201))
        _own_commit(lab, nft, f"add element inet vf_mon s {{ {elements} }}")
        assert monitor._drain() == Touch()
        assert monitor._summary.touch() == Touch()  # nothing of it was folded in
        lab.srv.nft("delete", "element", "inet", "vf_mon", "s", "{ 198.18.1.7 }")  # foreign
        assert monitor.wait(2.0) == Touch(sets=frozenset({"s"}))
    finally:
        monitor.close()
        lab.srv.nft("delete", "table", "inet", "vf_mon")
