"""The snapshots of a state directory, served as exports of their own.

Snapshot NAME (``dirtydiff checkpoint NAME --snapshot``) is export NAME,
next to the live one. Its data is never read here from the disk: the
tracker, the one process that writes the disk, copies a granule before it
lets a write change it and serves the view as at the checkpoint on its own
export ``@snapshot:NAME``, both under one lock; this export reads and trims
through that (docs/architecture.md has the argument). A sidecar that reads a
plain file with no tracker serves no snapshot.

Which snapshots exist is read from the state directory
(``dirtydiff.snapshots.read_snapshots``) whenever a client names or lists
exports: a new one is served without a restart, a released one vanishes. An
export is opened once per snapshot incarnation (its ``created_ns``) and
shared by its clients; every new tracker connection of it proves that the
tracker still serves that incarnation (``verify``), so that a client never
reads from two.

A broken snapshot is still served: its reads fail with EIO, as the tracker
answers them, never with data.
"""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from dirtydiff import errors
from dirtydiff.disk import NbdBackend
from dirtydiff.snapshots import SnapshotInfo, read_snapshots
from dirtydiff.state import StateDir
from sidecar.export.contexts import Export

log = logging.getLogger(__name__)

# The tracker's export of snapshot NAME.
TRACKER_EXPORT_PREFIX = "@snapshot:"


def tracker_export(name: str) -> str:
    return TRACKER_EXPORT_PREFIX + name


def snapshot_uri(tracker_uri: str, name: str) -> str:
    """The tracker's URI with its export name set to ``@snapshot:NAME``,
    percent-encoded (libnbd decodes the path into the export name)."""
    parts = urlsplit(tracker_uri)
    # By hand: urlunsplit drops the empty authority of nbd+unix:///...
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}/{quote(tracker_export(name), safe='')}{query}"


def snapshot_description(name: str, state_id: str) -> str:
    """What the tracker's export of snapshot ``name`` says of itself."""
    return f"dirtydiff snapshot {name} of state {state_id}"


@dataclass
class _Opened:
    created_ns: int
    export: Export


class SnapshotExports:
    """The snapshot exports of ``state``, whose tracker is at ``tracker_uri``
    and records for the state ``state_id`` (proven when the sidecar started)."""

    def __init__(self, state: StateDir, tracker_uri: str, state_id: str) -> None:
        self.state = state
        self.tracker_uri = tracker_uri
        self.state_id = state_id
        self._lock = threading.Lock()  # one opening per snapshot at a time
        self._opened: dict[str, _Opened] = {}

    def listed(self) -> dict[str, SnapshotInfo]:
        """The snapshots the state directory holds now; none if it cannot be
        read (said in the log: the live export goes on)."""
        try:
            return {info.name: info for info in read_snapshots(self.state)}
        except (OSError, errors.DirtydiffError) as e:
            log.warning("snapshots not served: %s", e)
            return {}

    def find(self, name: str) -> Export | None:
        return self._export(name, self.listed())

    def exports(self) -> list[Export]:
        listed = self.listed()
        found = [self._export(name, listed) for name in sorted(listed)]
        return [export for export in found if export is not None]

    def _export(self, name: str, listed: dict[str, SnapshotInfo]) -> Export | None:
        info = listed.get(name)
        with self._lock:
            opened = self._opened.get(name)
            if info is None:
                self._opened.pop(name, None)  # released: its clients keep their own
                return None
            if opened is not None and opened.created_ns == info.created_ns:
                return opened.export
            try:
                export = self._open(info)
            except OSError as e:
                log.warning("snapshot %s not served: %s", name, e.strerror or e)
                return None
            self._opened[name] = _Opened(info.created_ns, export)
            return export

    def _open(self, info: SnapshotInfo) -> Export:
        """The export of snapshot ``info``, its tracker export proven to be
        this state's snapshot of that name and of the disk's size."""
        name = info.name
        backend = NbdBackend(snapshot_uri(self.tracker_uri, name))
        expected = snapshot_description(name, self.state_id)
        if backend.description != expected:
            raise OSError(
                errno.ENXIO,
                f"the tracker's {tracker_export(name)} says {backend.description!r}, "
                f"not {expected!r}",
            )
        if backend.size != info.disk_size:
            raise OSError(
                errno.ENXIO,
                f"the tracker's {tracker_export(name)} has {backend.size} bytes, "
                f"the snapshot {info.disk_size}",
            )

        def verify() -> None:
            now = self.listed().get(name)
            if now is None or now.created_ns != info.created_ns:
                raise OSError(
                    errno.EIO,
                    f"snapshot {name!r} is not the one this connection chose any more "
                    "(released, or taken again); connect again",
                )

        return Export(
            name,
            backend,
            state=self.state,
            description=backend.description or "",
            snapshot=name,
            verify=verify,
        )
