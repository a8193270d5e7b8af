"""Errors a user can act on. Every message names the problem and the fix."""

from typing import Any


class PhysMasterError(ValueError):
    """Base class: bad input that the user can fix (a width, a file, a wiring)."""


class WidthMismatchError(PhysMasterError):
    """Two tensors that must share a width (channels) do not."""


class BatchMismatchError(PhysMasterError):
    """A batch that cannot be broadcast to another."""


class CheckpointError(PhysMasterError):
    """A checkpoint file that is missing, truncated, corrupt or not a PhysMaster file."""


def describe(value: Any) -> str:
    """A short description of an untrusted value (from a file or a browser) for an error message: a repr cut to
    40 characters, never the repr of a deep structure or of a huge number."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'list' if isinstance(value, list) else 'object'}"
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge number"
    return text if len(text) <= 40 else text[:37] + "..."
