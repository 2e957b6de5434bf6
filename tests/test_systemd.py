"""The systemd units: they verify, and their ExecStart lines run as written.

The ExecStart lines are taken from the unit files, with ``%i`` and the
variables of ``/etc/dirtydiff/%i.conf`` filled in, and with the directories
systemd would create (``/var/lib/dirtydiff``, ``/run/dirtydiff``) moved into
the test's temp dir. Each service must say READY=1 over $NOTIFY_SOCKET only
once its socket accepts connections.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_disk, qemu_io, run, stop

UNITS = ROOT / "systemd"
MiB = 1 << 20


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_verify() -> None:
    units = [
        str(UNITS / "dirtydiff-track@vda.service"),
        str(UNITS / "dirtydiff-sidecar@vda.service"),
    ]
    result = run(["systemd-analyze", "verify", *units], check=False)
    # systemd-analyze exits 0 on many problems and only prints them.
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr


def exec_start(unit: str, instance: str, env: dict[str, str], tmp: Path) -> list[str]:
    text = (UNITS / unit).read_text()
    (line,) = re.findall(r"^ExecStart=(.*)$", text, flags=re.M)
    line = line.replace("%i", instance)
    line = line.replace("/var/lib/dirtydiff", str(tmp / "lib")).replace(
        "/run/dirtydiff", str(tmp / "run")
    )
    argv = []
    for word in shlex.split(line):  # systemd's splitting, for these lines
        if word.startswith("$") and not word.startswith("${"):
            argv += env.get(word[1:], "").split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return argv


def start_notified(argv: list[str], tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start a Type=notify service's command; return it and its READY message."""
    notify = tmp / f"{name}.notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        listener.settimeout(30)
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "NOTIFY_SOCKET": str(notify),
        }
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            message = listener.recv(4096).decode()
        except BaseException:
            stop(proc)
            raise
    return proc, message


def test_exec_start_lines_run_and_notify_once_ready(tmp_path: Path) -> None:
    for d in ("lib/vm1", "run"):
        (tmp_path / d).mkdir(parents=True, mode=0o700)
    disk = make_disk(tmp_path / "vm1.raw", 8 * MiB)
    conf = {"DISK": str(disk), "SERVE_ARGS": "--bitmap @open"}
    tracker, message = start_notified(exec_start("dirtydiff-track@.service", "vm1", conf, tmp_path),
                                      tmp_path, "track")  # fmt: skip
    try:
        assert message.startswith("READY=1")
        vm_sock = tmp_path / "run" / "vm1.sock"
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(vm_sock))  # bound before READY: no retry needed
        qemu_io(f"nbd+unix:///?socket={vm_sock}", "write -P 7 1M 1")
        argv = exec_start("dirtydiff-sidecar@.service", "vm1", conf, tmp_path)
        sidecar, message = start_notified(argv, tmp_path, "sidecar")
        try:
            assert message.startswith("READY=1")
            backup_sock = tmp_path / "run" / "vm1-backup.sock"
            listed = run(
                ["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={backup_sock}"]
            ).stdout
            assert '"qemu:dirty-bitmap:@open"' in listed
            mapped = run(["nbdinfo", "--map=qemu:dirty-bitmap:@open",
                          f"nbd+unix:///?socket={backup_sock}"]).stdout  # fmt: skip
            assert "1048576       65536    1  dirty" in mapped
        finally:
            assert stop(sidecar) == 0
    finally:
        assert stop(tracker) == 0
