"""Read-only kernel view for ``why``: other tables' input chains, through the one nft adapter.

Owns which listings ``why`` uses. nft 1.0.6 fetches every set element for most
listings (``list ruleset``, ``list table``, even ``list tables``: ~1 s at 100k entries), so this
module sticks to ``list chains`` (all families) and ``list chain`` of other tables' chains,
never a listing of the agent's own table. It never changes anything in the kernel.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from agent.rules.nft import NftAdapter
from agent.why import ChainRef, RulesetView, input_base_chains, jump_targets, rules_by_chain

MAX_CHAINS_READ = 64


def read_other_input_chains(nft: NftAdapter, own_table: str) -> RulesetView:
    """Other tables' input base chains with the rules of them and every chain they jump to."""
    base = input_base_chains(nft.query({"list": {"chains": {}}}), own_table)
    rules: dict[ChainRef, tuple[tuple[int, tuple[Any, ...]], ...]] = {}
    todo = deque(b.ref for b in base)
    while todo and len(rules) < MAX_CHAINS_READ:
        ref = todo.popleft()
        if ref in rules:
            continue
        listed = rules_by_chain(
            nft.query(
                {"list": {"chain": {"family": ref.family, "table": ref.table, "name": ref.name}}}
            )
        )
        rules[ref] = listed.get(ref, ())
        for name in jump_targets(rules[ref]):
            todo.append(ChainRef(ref.family, ref.table, name))
    return RulesetView(tuple(base), rules)
