"""Exception types shared by the core, the CLI and the services (which map them to gRPC status codes)."""

from __future__ import annotations


class CfrsegError(Exception):
    """Base class of every error cfrseg raises on purpose."""


class InputError(CfrsegError, ValueError):
    """The user's input is wrong (bad file, wrong shape, mismatched geometry...). Maps to INVALID_ARGUMENT."""


class NotFoundError(CfrsegError, KeyError):
    """A named thing (case, key, checkpoint, run) does not exist. Maps to NOT_FOUND."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class ConfigError(CfrsegError, ValueError):
    """A configuration value is invalid. Maps to INVALID_ARGUMENT."""


class Cancelled(CfrsegError):
    """A stage stopped because its cancel flag was set. Maps to CANCELLED."""
