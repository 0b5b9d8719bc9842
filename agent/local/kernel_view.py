"""Read-only kernel view for ``why``: other tables' input chains, through the one nft adapter.

Owns which listings ``why`` uses. nft 1.0.6 fetches every set element for most
listings (``list ruleset``, ``list table``, even ``list tables``: ~1 s at 100k entries), so this
module sticks to ``list chains`` (all families), ``list chain`` of other tables' chains and
``list set`` of each named set those chains look up (a few ms even beside 100k entries of
another set), never a listing of the agent's own table. It never changes anything in the
kernel.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agent.errors import KernelError
from agent.rules.foreign import (
    ChainRef,
    NamedSet,
    RulesetView,
    input_base_chains,
    jump_targets,
    named_set,
    rules_by_chain,
    set_references,
)
from agent.rules.nft import NftAdapter

MAX_CHAINS_READ = 64
MAX_SETS_READ = 64


def read_other_input_chains(
    nft: NftAdapter, own_table: str, *, clock: Callable[[], float] = time.time
) -> RulesetView:
    """Other tables' input base chains with the rules of them and every chain they jump to,
    and the named sets those rules look up (a set that cannot be listed is left unread: the
    evaluation then says "may")."""
    read_at = clock()
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
    wanted = sorted(
        {
            ChainRef(ref.family, ref.table, name)
            for ref, r in rules.items()
            for name in set_references(r)
        }
    )
    sets: dict[ChainRef, NamedSet] = {}
    for ref in wanted[:MAX_SETS_READ]:
        try:
            answer = nft.query(
                {"list": {"set": {"family": ref.family, "table": ref.table, "name": ref.name}}}
            )
        except KernelError:  # gone meanwhile, or a map: unread
            continue
        for item in answer:
            if "set" in item:
                sets[ref] = named_set(item, read_at)
    return RulesetView(tuple(base), rules, sets, read_at)
