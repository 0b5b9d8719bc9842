"""The agent's nftables table: install, adopt, change entries, read back.

Owns every conversation with the kernel about ``inet <table>`` through ``NftAdapter``. It never
touches another table and never flushes the ruleset; every change is one transaction.

Changes are planned from the caller's belief of what is present and sent optimistically: adds go
as ``create`` (EEXIST if the element is there after all), refreshes and removals as ``delete``
(ENOENT if it expired meanwhile). Either error aborts the whole batch, so a wrong belief can never
half-apply; the affected sets are then read back fresh, the plan recomputed and the batch retried
a bounded number of times. The happy path costs one transaction and no read-back, which keeps a
single-entry change cheap however large the set is.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from agent.config import FirewallConfig
from agent.errors import KernelError
from agent.model import Element, EntryKey, ObservedElement
from agent.rules import render
from agent.rules.nft import ElementConflict, NftAdapter
from agent.rules.plan import ElementPlan, plan_changes, plan_replace_all
from agent.rules.readback import (
    CounterValue,
    TableShape,
    parse_counters,
    parse_set_elements,
    parse_table_shape,
)

MAX_ATTEMPTS = 4
_PROBE_SET = "probe_features"


@dataclass(frozen=True, slots=True)
class Features:
    """What the running kernel and libnftables do, measured at start rather than guessed."""

    kernel_release: str
    nft_version: str
    readd_updates_timeout: bool
    destroy_supported: bool


@dataclass(frozen=True, slots=True)
class AppliedPlan:
    """What one ``apply`` really changed, after any retries."""

    plan: ElementPlan
    attempts: int


class FirewallTable:
    def __init__(self, cfg: FirewallConfig, nft: NftAdapter) -> None:
        self.cfg = cfg
        self.nft = nft
        self.features: Features | None = None

    # --- structure --------------------------------------------------------------------------

    def exists(self) -> bool:
        try:
            self.shape()
        except KernelError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def install(self) -> None:
        """Create the table, or repair its structure in place keeping every allow element."""
        self.nft.apply(render.encode_commands(render.render_table(self.cfg)))

    def delete(self) -> None:
        """Remove the agent's table (package purge); absent is fine."""
        if self.exists():
            self.nft.apply(render.encode_commands(render.render_delete_table(self.cfg.table)))

    def shape(self) -> TableShape:
        items = self.nft.query(
            {"list": {"table": {"family": render.FAMILY, "name": self.cfg.table}}}, terse=True
        )
        return parse_table_shape(items)

    def probe(self) -> Features:
        """Measure kernel behaviour on a scratch set inside our own table, then remove it."""
        t = self.cfg.table
        ref = {"family": render.FAMILY, "table": t, "name": _PROBE_SET}
        addr = "192.0.2.1"

        def elem(timeout: int) -> dict[str, object]:
            return {"elem": {"val": addr, "timeout": timeout}}

        self.nft.apply(
            render.encode_commands(
                [
                    {"add": {"set": {**ref, "type": "ipv4_addr", "flags": ["timeout"], "size": 4}}},
                    {"flush": {"set": ref}},
                    {"add": {"element": {**ref, "elem": [elem(600)]}}},
                ]
            )
        )
        try:
            self.nft.apply(
                render.encode_commands([{"add": {"element": {**ref, "elem": [elem(3600)]}}}])
            )
            listed = self.nft.query({"list": {"set": ref}})
            timeout = next(
                (int(e["elem"]["timeout"]) for i in listed for e in i["set"].get("elem", ())),
                0,
            )
            # `destroy` (delete if present) needs kernel 6.3 and nft 1.0.7; Debian 12 has neither.
            try:
                self.nft.apply(
                    render.encode_commands(
                        [{"destroy": {"element": {**ref, "elem": ["192.0.2.2"]}}}]
                    )
                )
                destroy = True
            except KernelError:
                destroy = False
        finally:
            self.nft.apply(render.encode_commands([{"delete": {"set": ref}}]))
        meta = self.nft.metainfo()
        self.features = Features(
            kernel_release=os.uname().release,
            nft_version=str(meta.get("version", "unknown")),
            readd_updates_timeout=timeout == 3600,
            destroy_supported=destroy,
        )
        return self.features

    # --- elements ---------------------------------------------------------------------------

    def read_elements(
        self, sets: Iterable[tuple[str, int]] | None = None
    ) -> dict[EntryKey, ObservedElement]:
        """Fresh read-back of allow elements (all allow sets, or the given (profile, family))."""
        wanted = (
            list(sets)
            if sets is not None
            else [(p.name, fam) for p in self.cfg.profiles for fam in (4, 6)]
        )
        out: dict[EntryKey, ObservedElement] = {}
        for profile, family in wanted:
            ref = {
                "family": render.FAMILY,
                "table": self.cfg.table,
                "name": render.allow_set(profile, family),
            }
            items = self.nft.query({"list": {"set": ref}})
            for e in parse_set_elements(items, self.cfg.ipv6_prefix):
                out[e.key] = e
        return out

    def counters(self) -> dict[str, CounterValue]:
        items = self.nft.query(
            {"list": {"counters": {"family": render.FAMILY, "table": self.cfg.table}}}
        )
        return parse_counters(items)

    def apply(
        self,
        upserts: Sequence[Element] = (),
        removals: Sequence[EntryKey] = (),
        *,
        present: Collection[EntryKey] | None = None,
    ) -> AppliedPlan:
        """Add or refresh ``upserts`` and remove ``removals`` in one transaction.

        ``present`` is the caller's belief of which keys are in the kernel; without it the
        touched sets are read back first. The result's plan says what really happened: removals
        of keys that were not there are absent from ``plan.removes``.
        """
        touched = {(e.key.profile, e.key.address.family) for e in upserts} | {
            (k.profile, k.address.family) for k in removals
        }
        # A set of keys, not the read-back's keys() view: the view would keep every observed
        # element and its comment alive while the batch is sent (~25 MB at 100k elements).
        belief: Collection[EntryKey]
        belief = present if present is not None else set(self.read_elements(touched))
        for attempt in range(1, MAX_ATTEMPTS + 1):
            plan = plan_changes(upserts, removals, belief)
            if plan.empty:
                return AppliedPlan(plan, attempt)
            try:
                self._send(plan)
            except ElementConflict:
                if attempt == MAX_ATTEMPTS:
                    raise
                belief = set(self.read_elements(touched))
                continue
            return AppliedPlan(plan, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def replace_all(self, desired: Sequence[Element]) -> AppliedPlan:
        """Make the allow sets hold exactly ``desired`` (one transaction, retried on races)."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            plan = plan_replace_all(desired, self.read_elements())
            if plan.empty:
                return AppliedPlan(plan, attempt)
            try:
                self._send(plan)
            except ElementConflict:
                if attempt == MAX_ATTEMPTS:
                    raise
                continue
            return AppliedPlan(plan, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(self, plan: ElementPlan) -> None:
        destroy = bool(self.features and self.features.destroy_supported)
        # Encoded here so that only the bytes are alive during the call: a str would be copied
        # again by the binding while still referenced (13 MB per copy at 100k elements).
        batch = render.encode_element_batch(
            self.cfg.table, deletes=plan.deletes, creates=plan.creates, destroy=destroy
        ).encode()
        self.nft.apply(batch)
