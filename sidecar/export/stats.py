"""What the export counts for /metrics (``sidecar.metrics`` reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dirtydiff.nbdproto import Cmd

# Request counters are keyed by the spec's command names, lower case.
_COMMAND_NAMES = {int(c): c.name.lower() for c in Cmd}


@dataclass
class ServerStats:
    """What the export counts for /metrics: plain integers, bumped in the
    event loop (one thread), read at scrape time."""

    connections_total: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # by command
    errors: dict[str, int] = field(default_factory=dict)  # by errno name, or "protocol"

    def request(self, kind: int) -> None:
        name = _COMMAND_NAMES.get(kind, "unknown")
        self.requests[name] = self.requests.get(name, 0) + 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
