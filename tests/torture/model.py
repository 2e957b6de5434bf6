"""What the scenario knows about its bitmaps: which backup each one completes.

A **claim** is the promise a backup tool relies on: the backup plus the
granules dirty in these bitmaps, read from the disk at the end, equal the disk
at the end. Claims are made only where the invariant promises them:

- a copy of the disk taken after ``checkpoint`` returned is completed by
  ``@open`` (every write after the switch, and every write in flight at it, is
  recorded there), and by every later checkpoint together with ``@open``, as a
  backup tool merges bitmaps. A copy taken before any write (B0) is completed
  by the whole chain since the tracker started;
- a copy taken after ``bitmap add NAME`` returned is completed by NAME;
- a scan of NAME against backup B completes B, from the end of the scan on
  (NAME records like any enabled bitmap);
- a copy taken after ``bitmap clear NAME`` returned is completed by NAME: a
  cleared bitmap counts from the clear, and every older claim on NAME goes;
- a disabled bitmap stops recording: it completes nothing any more (its
  claims go), but stays consistent and exported, frozen.

A simulated host crash makes every bitmap that was recording unprovable: those
must be reported inconsistent (sticky) and never exported; every claim that
needs one of them is skipped by the check, which instead requires exactly
that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.torture.world import Backup

OPEN = "@open"


@dataclass
class Claim:
    backup: Backup
    why: str
    chain_from: int | None = None  # the checkpoint chain from this index on, then @open
    names: tuple[str, ...] = ()  # or these bitmaps


@dataclass
class Model:
    chain: list[str] = field(default_factory=list)  # checkpoints, oldest first
    recording: set[str] = field(default_factory=set)  # user and scan bitmaps (not @open)
    frozen: set[str] = field(default_factory=set)  # user bitmaps disabled: consistent, still
    doubtful: set[str] = field(default_factory=set)  # must be reported inconsistent
    open_doubtful: bool = False  # the current @open was recording at a host crash
    claims: list[Claim] = field(default_factory=list)
    counter: int = 0

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def bitmaps_of(self, claim: Claim) -> tuple[str, ...]:
        if claim.chain_from is None:
            return claim.names
        return (*self.chain[claim.chain_from :], OPEN)

    def checkpointed(self, name: str) -> None:
        """``name`` froze @open: it carries @open's doubt; the new @open is whole."""
        self.chain.append(name)
        if self.open_doubtful:
            self.doubtful.add(name)
            self.open_doubtful = False

    def forget(self, name: str) -> None:
        """``name`` no longer counts from what it counted from (cleared,
        removed and added again, disabled): no claim rests on it."""
        self.claims = [c for c in self.claims if name not in c.names]

    def disabled(self, name: str) -> None:
        self.forget(name)
        self.recording.discard(name)
        self.frozen.add(name)

    def host_crashed(self) -> None:
        self.open_doubtful = True
        self.doubtful |= self.recording

    def expected_inconsistent(self) -> set[str]:
        return self.doubtful | ({OPEN} if self.open_doubtful else set())

    def known(self) -> set[str]:
        """Every bitmap the scenario made (others it may find are unexpected)."""
        return {OPEN, *self.chain, *self.recording, *self.frozen}
