"""The ruleset generation (``agent.rules.monitor.generation``) that lets a clean restart skip
listing the elements: it must move with every committed change, of any table, and only then."""

from __future__ import annotations

from netlab import Lab

from agent.rules.monitor import generation


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
