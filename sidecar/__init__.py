"""The sidecar: diff scan, NBD export, control API and the dirtydiff CLI."""
