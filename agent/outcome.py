"""A request's answer (the protocol's ``ApplyResult``) and how the request log stores it.

Pure: a value and its encoding; what the answer says is decided in ``agent.state``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from agent.state import EntryResult, Status


@dataclass(frozen=True, slots=True)
class Outcome:
    """A request's answer: the protocol's ``ApplyResult``."""

    request_id: str
    results: tuple[EntryResult, ...]
    state_version: int
    erased_records: int = 0

    def encode(self) -> bytes:
        return json.dumps(
            {
                "r": self.request_id,
                "v": self.state_version,
                "e": self.erased_records,
                "x": [
                    [r.address, r.profile, int(r.status), r.expires_at_ms, r.reason]
                    for r in self.results
                ],
            },
            separators=(",", ":"),
        ).encode()

    @staticmethod
    def decode(data: bytes) -> Outcome:
        d = json.loads(data)
        return Outcome(
            request_id=d["r"],
            state_version=d["v"],
            erased_records=d["e"],
            results=tuple(EntryResult(a, p, Status(s), x, why) for a, p, s, x, why in d["x"]),
        )
