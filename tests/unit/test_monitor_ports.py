"""Which sockets a /proc/net/netlink listing binds to a port: how the notification listener tells
the agent's own commits from foreign ones (``agent.rules.monitor``), in any PID namespace."""

from __future__ import annotations

import pytest

from agent.rules.monitor import netlink_socket_inodes

_LISTING = """\
sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
00000000fb5feb2d 0   0          00000000 0        0        0     2        0        4
000000002b40ee31 12  0          00000000 0        0        0     2        0        221
00000000f19a5673 12  1          00000040 0        0        0     2        0        3301
000000007854cefd 12  4294963201 00000000 0        0        0     2        0        3302
0000000011111111 0   1          00000000 0        0        0     2        0        3303
"""


@pytest.mark.parametrize(
    ("port", "inodes"),
    [
        (1, {3301}),  # nf_tables socket bound to port 1; the rtnetlink socket on 1 is not
        (4294963201, {3302}),  # an autobound (negative) port, printed unsigned as in NEWGEN
        (7, set()),  # nobody
    ],
)
def test_the_nf_tables_socket_of_a_port_is_found_by_inode(port: int, inodes: set[int]) -> None:
    assert netlink_socket_inodes(_LISTING, port) == inodes


def test_a_malformed_listing_names_no_socket() -> None:
    assert netlink_socket_inodes("sk Eth Pid\n0 12 x y\n\n", 1) == set()
