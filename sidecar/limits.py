"""The export's limits on its clients, importable without the server (the
CLI shows them in ``serve --help`` without loading numpy and asyncio)."""

from __future__ import annotations

# Clients served at once unless ``serve --max-connections`` says otherwise:
# many more than the backup tools of one disk open (ovirt-imageio: up to 8),
# few enough that their descriptors leave the rest of the sidecar room.
MAX_CONNECTIONS = 128
# Descriptors a connection holds: its socket, and the sender's own copy of it.
FDS_PER_CONNECTION = 2
# Seconds from a connection to its NBD_OPT_GO (or EXPORT_NAME), as qemu-nbd's
# handshake limit: a client still negotiating then is closed.
HANDSHAKE_LIMIT = 10.0
