"""``dirtydiff digest``: read a backup once and write its manifest.

It needs no tracker and no state directory, so it can run on the backup's
own host, where the read is local; the manifest then travels to the scan
(``dirtydiff scan --manifest``), and the backup never crosses the network.
"""

from __future__ import annotations

import argparse
import sys
import time

from dirtydiff.manifest import ManifestWriter
from sidecar.cli.output import emit, human_size, progress_printer
from sidecar.scan.engine import Scan, open_side
from sidecar.scan.manifest import ManifestMaker, ManifestRecorder


def write_manifest(backup: str, output: str, granularity: int) -> dict[str, object]:
    """Digest ``backup`` (an NBD URI or a file) into the manifest ``output``."""
    interactive = sys.stderr.isatty()
    side = open_side("backup", backup)
    try:
        writer = ManifestWriter.create(output, side.size, granularity, backup)
        maker = ManifestMaker(ManifestRecorder(writer))
        try:
            started = time.monotonic()
            scan = Scan(
                side, maker, granularity, on_marks=lambda ranges: None,
                on_position=progress_printer(interactive),
            )  # fmt: skip
            progress = scan.run()
            checksum = writer.commit()
        except BaseException:
            writer.discard()
            raise
        finally:
            maker.close()
        if interactive:
            sys.stderr.write("\n")
    finally:
        side.close()
    header = writer.header
    return {
        "manifest": output,
        "source": backup,
        "size": header.size,
        "granularity": header.granularity,
        "granules": header.granules,
        "digest_bits": 8 * header.digest,
        "checksum": checksum.hex(),
        "read": progress.read_disk,
        "elapsed": time.monotonic() - started,
    }


def cmd_digest(args: argparse.Namespace) -> int:
    result = write_manifest(args.backup, args.output, args.granularity)
    emit(
        result,
        args.json,
        lambda r: print(
            f"manifest {r['manifest']}: {r['granules']} granules of "
            f"{human_size(int(r['granularity']))} of {args.backup} "
            f"({human_size(int(r['size']))}, {human_size(int(r['read']))} read)"
        ),
    )
    return 0
