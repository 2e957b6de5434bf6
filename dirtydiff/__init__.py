"""dirtydiff's core, shared by the tracker (inside nbdkit) and the sidecar.

Everything here is free of nbdkit and of asyncio so that both processes can
import it and tests can drive it directly: the bitmap file format, extent
logic, the state directory and the control protocol.
"""
