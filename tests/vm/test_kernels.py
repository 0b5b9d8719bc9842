"""What depends on the kernel, proven on each release's own kernel (6.1 for 12, 6.12 for 13).

Each test reads one verdict of the guest's run (``guest.py`` says how each is measured): the
package installs and starts under the shipped unit, a refresh really extends an element's
timeout (6.1 ignores a re-add: the agent deletes and adds in one transaction), a revoke cuts an
established flow (by the kernel's dump filter, or the full dump where the kernel has no filter),
``nft flush ruleset`` is repaired within 1 s (generation notifications, not the periodic check:
that runs every 30 s), and a restart loses no probe packet.
"""

from __future__ import annotations

import pytest
from vmkit import RELEASES, GuestRun

# One boot per release, its image built from the archive on first use: minutes, not seconds.
pytestmark = pytest.mark.timeout(1800)

KERNEL_SERIES = {"bookworm": "6.1.", "trixie": "6.12."}


def verdict(guest: GuestRun, check: str) -> None:
    result = guest.checks.get(check)
    if "guest_crashed" in guest.checks:
        pytest.fail(f"the guest's checks crashed: {guest.checks['guest_crashed']}")
    assert result is not None, f"{check} was never reported; console:\n{guest.console_tail()}"
    assert result["ok"], f"{check}: {result}"


def test_the_vm_runs_the_releases_own_kernel(guest: GuestRun, release: str) -> None:
    kernel = guest.checks["kernel"]["release"]
    assert kernel.startswith(KERNEL_SERIES[release]), (release, RELEASES[release], kernel)


def test_the_package_installs_and_starts_under_the_shipped_unit(guest: GuestRun) -> None:
    verdict(guest, "package_installs")
    verdict(guest, "starts_under_the_shipped_unit")


def test_sip_is_blocked_until_allowed_and_then_answered(guest: GuestRun) -> None:
    verdict(guest, "sip_answered_before_the_agent_starts")
    verdict(guest, "sip_blocked_before_allow")
    verdict(guest, "allow_opens_sip")


def test_a_refresh_extends_the_elements_timeout_in_the_kernel(guest: GuestRun) -> None:
    verdict(guest, "refresh_extends_the_element_timeout")


def test_a_revoke_cuts_the_established_flow(guest: GuestRun) -> None:
    verdict(guest, "revoke_cuts_the_established_flow")
    verdict(guest, "revoked_flow_is_dropped")


def test_flush_ruleset_is_repaired_within_one_second(guest: GuestRun) -> None:
    verdict(guest, "flush_ruleset_is_repaired_within_1s")


def test_a_restart_loses_no_probe_packet(guest: GuestRun) -> None:
    verdict(guest, "restart_loses_no_probe")
