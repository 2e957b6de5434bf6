"""The sidecar's NBD export: the disk read-only, with base:allocation and
qemu:dirty-bitmap:NAME block status, as ``qemu-nbd -B NAME`` serves it; and
each snapshot as an export of its own, the disk as at its checkpoint.
qemu-nbd 7.2 is the reference for every doubtful case.

By role:

- ``server``: the listeners, the connections, and the limits on them
  together (``NbdServer``); ``budget``: the read buffers they may hold;
- ``connection``: one client from accept to close;
- ``handshake``: the options, up to NBD_OPT_GO, and the meta contexts;
- ``transmission``: the request loop, the dispatch, reads and block status;
- ``sender``: replies written whole, file data by sendfile(2), or through
  the TLS transport on a TLS stream;
- ``tls``: x509 credentials, client certificate DNs (``TlsCreds``);
- ``contexts``: what an export offers (its bitmap policy) and the block
  status of each context;
- ``upstream``: a few connections to an NBD disk, shared by the clients;
- ``catalog``: the export names a client may choose, snapshots found as it
  asks; ``snapshots``: each snapshot of the state served as export NAME;
  ``aioupstream``: a snapshot's connections to the tracker, in the event loop;
- ``stats``: what it counts for /metrics.

The wire format, every reply header included, is ``dirtydiff.nbdproto``'s.
"""

from sidecar.export.contexts import Export
from sidecar.export.server import NbdServer
from sidecar.export.stats import ServerStats

__all__ = ["Export", "NbdServer", "ServerStats"]
