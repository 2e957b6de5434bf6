"""The sidecar's NBD export (``server``), and its connections to an NBD disk
(``upstream``)."""

from sidecar.export.server import Export, NbdServer, ServerStats

__all__ = ["Export", "NbdServer", "ServerStats"]
