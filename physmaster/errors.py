"""Errors a user can act on. Every message names the problem and the fix."""


class PhysMasterError(ValueError):
    """Base class: bad input that the user can fix (a width, a file, a wiring)."""


class WidthMismatchError(PhysMasterError):
    """Two tensors that must share a width (channels) do not."""


class BatchMismatchError(PhysMasterError):
    """A batch that cannot be broadcast to another."""


class CheckpointError(PhysMasterError):
    """A checkpoint file that is missing, truncated, corrupt or not a PhysMaster file."""
