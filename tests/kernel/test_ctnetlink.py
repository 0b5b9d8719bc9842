"""The small ctnetlink reader against the real kernel: a dump reads every flow of its family with
both sources, a delete takes exactly the flow it was given, and a flow re-created with the same
tuple since the dump is left alone (the delete names the flow's id as well)."""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest
from tablekit import Rig

from agent.rules.ctnetlink import CtNetlink

TUPLE = ("-p", "udp", "--dport", "5060", "--timeout", "600")


def insert(rig: Rig, source: str, destination: str, sport: int) -> None:
    rig.lab.srv.run(
        "conntrack", "-I", *TUPLE, "-s", source, "-d", destination, "--sport", str(sport)
    )


def flows_from(rig: Rig, source: str) -> list[str]:
    return rig.lab.srv.conntrack("-p", "udp", "--src", source)


@pytest.mark.parametrize(
    ("family", "source", "destination"),
    [
        (socket.AF_INET, "198.18.5.1", "198.18.5.254"),
        (socket.AF_INET6, "2001:db8:5::1", "2001:db8:5::fe"),
    ],
)
def test_a_dump_reads_each_flow_of_its_family_with_both_sources(
    rig: Rig, family: int, source: str, destination: str
) -> None:
    insert(rig, source, destination, 40001)
    insert(rig, source, destination, 40002)

    with rig.lab.srv.call(CtNetlink, family) as ct:
        flows = [f for f in ct.dump() if f.orig_source == ipaddress.ip_address(source)]

    assert len(flows) == 2
    assert {f.reply_source for f in flows} == {ipaddress.ip_address(destination)}


def test_a_delete_takes_its_flow_and_spares_one_re_created_with_the_same_tuple(
    rig: Rig,
) -> None:
    source, other = "198.18.5.1", "198.18.5.2"
    insert(rig, source, "198.18.5.254", 40001)
    insert(rig, other, "198.18.5.254", 40001)
    with rig.lab.srv.call(CtNetlink, socket.AF_INET) as ct:
        (mine,) = [f for f in ct.dump() if f.orig_source == ipaddress.ip_address(source)]

        ct.delete(mine)
        assert flows_from(rig, source) == []
        assert len(flows_from(rig, other)) == 1  # only the flow it was given

        insert(rig, source, "198.18.5.254", 40001)  # the same tuple, a new flow
        with pytest.raises(FileNotFoundError) as gone:  # OSError with errno ENOENT
            ct.delete(mine)
        assert gone.value.errno == errno.ENOENT
        assert len(flows_from(rig, source)) == 1
