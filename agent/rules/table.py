"""The agent's nftables table: install, adopt, change entries, read back.

Owns every conversation with the kernel about ``inet <table>`` through ``NftAdapter``. It never
touches another table and never flushes the ruleset; every change is one transaction.

Changes are planned from the caller's belief of what is present and sent optimistically: adds go
as ``create`` (EEXIST if the element is there after all), refreshes and removals as ``delete``
(ENOENT if it expired meanwhile). Either error aborts the whole batch, so a wrong belief can never
half-apply; the affected sets are then read back fresh, the plan recomputed and the batch retried
a bounded number of times. The happy path costs one transaction and no read-back, which keeps a
single-entry change cheap however large the set is.

Kernel failure modes and how each is met (RULESET.md):

- an element to delete expired meanwhile, or one to create is there after all: ENOENT/EEXIST,
  nothing changed; re-read, recompute, retry (``MAX_ATTEMPTS`` in all);
- a full set: ENFILE, nothing changed; ``SetFull``, never retried;
- a batch too large for one netlink message: libnftables itself splits each element list over
  as many NEWSETELEM/DELSETELEM messages as the 16-bit attribute length allows (~64 KiB each),
  packs them between one BATCH_BEGIN and one BATCH_END, raises the socket's send buffer to
  hold them (SO_SNDBUFFORCE) and sends them in one sendmsg; the kernel commits or aborts that
  batch as one transaction (``test_a_batch_larger_than_one_netlink_message_lands_...``);
- such a batch refused in many of its messages: the kernel reports each refused message with a
  copy of it (~64 KiB; libnftables does not ask for capped acks) and stops reporting once the
  socket's receive buffer (rmem_default, 208 KiB) is full, so libnftables fails with ENOBUFS
  instead of the real errno - e.g. 70,000 creates into a set of size 65,536, or thousands of
  stale creates at once. The transaction was still aborted whole. The touched sets are re-read
  and the plan recomputed: if it would overfill a set the answer is ``SetFull``, otherwise (the
  refusals were conflicts) the batch is retried once more;
- a read-back torn by a concurrent hash resize: re-read (``READ_ATTEMPTS``), then
  ``TornListing``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from agent.config import FirewallConfig
from agent.errors import KernelError, SetFull
from agent.model import Element, EntryKey, ObservedElement
from agent.rules import render
from agent.rules.nft import ElementConflict, NftAdapter
from agent.rules.plan import ElementPlan, plan_changes, plan_replace_all, set_overflows
from agent.rules.readback import (
    CounterValue,
    TableShape,
    parse_counters,
    parse_set_elements,
    parse_table_shape,
    repeated_values,
)

MAX_ATTEMPTS = 4
# From this many elements on, a batch is sent inside the ``quiet`` scope the table was given
# (the daemon's: its notification listener leaves the group, see ``NftMonitor.not_listening``).
QUIET_BATCH = 1_000
# Listings of one set before a torn read-back is an error. A resize of a set's hash table takes
# a few ms and one listing of a large set far longer, so a second read is whole in practice.
READ_ATTEMPTS = 5
_PROBE_SET = "probe_features"


@dataclass(frozen=True, slots=True)
class Features:
    """What the running kernel and libnftables do, measured at start rather than guessed."""

    kernel_release: str
    nft_version: str
    readd_updates_timeout: bool
    destroy_supported: bool


class TornListing(KernelError):
    """Every listing of a set repeated elements (a dump torn by a hash resize, see readback)."""

    def __init__(self, set_name: str, attempts: int) -> None:
        super().__init__(
            "torn_listing",
            errno.EINTR,  # what netlink uses for an inconsistent dump
            f"{attempts} listings of set {set_name} each named an element twice",
        )


@dataclass(frozen=True, slots=True)
class AppliedPlan:
    """What one ``apply`` really changed, after any retries."""

    plan: ElementPlan
    attempts: int


class FirewallTable:
    def __init__(
        self,
        cfg: FirewallConfig,
        nft: NftAdapter,
        *,
        quiet: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self.cfg = cfg
        self.nft = nft
        self.quiet = quiet  # entered around each batch of QUIET_BATCH elements or more
        self.features: Features | None = None

    # --- structure --------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether ``inet <table>`` is in the kernel, from listings that do not fail on absence.

        Not from listing the table itself: libnftables answers that for a missing table from its
        own cache, so no kernel errno tells "absent" from "broken" (the C errno is left over,
        e.g. EAGAIN). ``list chains`` is the cheap answer (0.4 ms with 100k elements), and an
        installed table always has chains; only a table emptied of them by hand needs ``list
        tables``, which on nft 1.0.6 fetches every set element first (~0.6 s at 100k).
        """
        for kind in ("chains", "tables"):
            items = self.nft.query({"list": {kind: {"family": render.FAMILY}}})
            if any(self._ours(item, kind) for item in items):
                return True
        return False

    def _ours(self, item: dict[str, Any], kind: str) -> bool:
        obj = item.get(kind[:-1])
        if not isinstance(obj, dict) or obj.get("family") != render.FAMILY:
            return False
        return obj.get("table" if kind == "chains" else "name") == self.cfg.table

    def install(self) -> None:
        """Create the table, or repair its structure in place keeping every allow element."""
        self.nft.apply(render.encode_commands(render.render_table(self.cfg)))

    def delete(self) -> None:
        """Remove the agent's table (package purge); absent is fine, even if it goes meanwhile."""
        if not self.exists():
            return
        try:
            self.nft.apply(render.encode_commands(render.render_delete_table(self.cfg.table)))
        except KernelError:
            if self.exists():
                raise

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
        """Fresh read-back of allow elements (all allow sets, or the given (profile, family)).

        A listing that names an element twice was torn by a concurrent hash resize and may miss
        as many others: it is read again, up to ``READ_ATTEMPTS`` times, then ``TornListing``.
        """
        wanted = (
            list(sets)
            if sets is not None
            else [(p.name, fam) for p in self.cfg.profiles for fam in (4, 6)]
        )
        out: dict[EntryKey, ObservedElement] = {}
        for profile, family in wanted:
            items = self._whole_listing(render.allow_set(profile, family))
            for e in parse_set_elements(items, self.cfg.ipv6_prefix):
                out[e.key] = e
        return out

    def _whole_listing(self, set_name: str) -> list[dict[str, Any]]:
        ref = {"family": render.FAMILY, "table": self.cfg.table, "name": set_name}
        for _ in range(READ_ATTEMPTS):
            items = self.nft.query({"list": {"set": ref}})
            if not repeated_values(items):
                return items
            del items  # before the next listing, not after it: a 100k listing is ~50 MB
        raise TornListing(set_name, READ_ATTEMPTS)

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
        return self._converge(
            touched, lambda belief: plan_changes(upserts, removals, belief), present
        )

    def replace_all(self, desired: Sequence[Element]) -> AppliedPlan:
        """Make the allow sets hold exactly ``desired`` (one transaction, retried on races)."""
        every = {(p.name, fam) for p in self.cfg.profiles for fam in (4, 6)}
        return self._converge(every, lambda belief: plan_replace_all(desired, belief), None)

    def _observe(self, sets: Iterable[tuple[str, int]]) -> set[EntryKey]:
        # A set of keys, not the read-back's keys() view: the view would keep every observed
        # element and its comment alive while the batch is sent (~25 MB at 100k elements).
        return set(self.read_elements(sets))

    def _converge(
        self,
        touched: Collection[tuple[str, int]],
        plan_for: Callable[[Collection[EntryKey]], ElementPlan],
        present: Collection[EntryKey] | None,
    ) -> AppliedPlan:
        """Send ``plan_for(belief)``; on a refusal that a fresh belief can settle, re-plan."""
        belief = present if present is not None else self._observe(touched)
        overflow_retried = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            plan = plan_for(belief)
            if plan.empty:
                return AppliedPlan(plan, attempt)
            try:
                self._send(plan)
            except ElementConflict:
                if attempt == MAX_ATTEMPTS:
                    raise
                belief = self._observe(touched)
                continue
            except KernelError as exc:
                # ENOBUFS: refusals were lost, not the batch applied (see the module docstring).
                if exc.errno != errno.ENOBUFS or overflow_retried or attempt == MAX_ATTEMPTS:
                    raise
                overflow_retried = True
                belief = self._observe(touched)
                self._refuse_overflow(plan_for(belief), belief)
                continue
            return AppliedPlan(plan, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _refuse_overflow(self, plan: ElementPlan, present: Collection[EntryKey]) -> None:
        sizes = {4: self.cfg.set_size_ipv4, 6: self.cfg.set_size_ipv6}
        over = set_overflows(plan, present, sizes)
        if over:
            detail = ", ".join(
                f"{render.allow_set(o.profile, o.family)} would hold {o.after} of {o.size}"
                for o in over
            )
            raise SetFull(f"a set is at its configured size: {detail}")

    def _send(self, plan: ElementPlan) -> None:
        destroy = bool(self.features and self.features.destroy_supported)
        # Encoded here so that only the bytes are alive during the call: a str would be copied
        # again by the binding while still referenced (13 MB per copy at 100k elements).
        batch = render.encode_element_batch(
            self.cfg.table, deletes=plan.deletes, creates=plan.creates, destroy=destroy
        ).encode()
        self._apply_elements(batch, plan)

    def _apply_elements(self, batch: str | bytes, plan: ElementPlan) -> None:
        """One batch changing ``plan``'s elements (and maybe more), in the quiet scope if big."""
        big = len(plan.deletes) + len(plan.creates) >= QUIET_BATCH
        with self.quiet() if big else contextlib.nullcontext():
            self.nft.apply(batch)

    # --- lifecycle (reconcile) ----------------------------------------------------------------

    def install_with(
        self,
        upserts: Sequence[Element] = (),
        removals: Sequence[EntryKey] = (),
        *,
        present: Collection[EntryKey],
        structure: Sequence[render.Command] | None = None,
    ) -> None:
        """The table's structure and an element change in ONE transaction.

        ``structure`` is the batch that repairs it (default: ``render_table``, which keeps
        everything it does not name).

        Used to restore a flushed or partly deleted table: the rules never exist without the
        entries they should admit. ``present`` must be a fresh read-back; if the batch still
        races the kernel (an element came or went meanwhile), the structure is installed alone
        and the elements are applied with a fresh read-back.
        """
        plan = plan_changes(upserts, removals, present)
        structure_text = render.encode_commands(
            render.render_table(self.cfg) if structure is None else structure
        )
        if plan.empty:
            self.nft.apply(structure_text)
            return
        destroy = bool(self.features and self.features.destroy_supported)
        elements = render.encode_element_batch(
            self.cfg.table, deletes=plan.deletes, creates=plan.creates, destroy=destroy
        )
        head = '{"nftables":['
        if not (structure_text.startswith(head) and elements.startswith(head)):
            raise AssertionError("unexpected batch encoding")  # pragma: no cover
        batch = structure_text[:-2] + "," + elements[len(head) :]
        try:
            self._apply_elements(batch.encode(), plan)
        except ElementConflict:
            self.nft.apply(structure_text)
            self.apply(upserts, removals)
