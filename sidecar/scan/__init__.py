"""Scans: the engine that diffs a disk against a backup, a scan as a job on
a state directory, and the sidecar's table of running jobs."""
