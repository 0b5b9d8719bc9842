"""The on-host Unix socket (PROTOCOL.md "Local socket"): its wire format, policy, server, client.

Wire format, decided here: line-delimited JSON over ``AF_UNIX``/``SOCK_STREAM``. gRPC over a
``unix:`` target does not hand the peer's ``SO_PEERCRED`` to Python handlers, and the peer's
Unix credentials are what stand in for mTLS and signatures on this socket; a plain stream
socket gives them to us per connection. See ``agent.local.wire`` for the messages.
"""
