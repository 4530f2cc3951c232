"""One exception root; each subclass tells the operator what to do.

The CLI prints ``str(error)`` on one line and exits non-zero for any
:class:`AdpulseError`: these are user or environment mistakes, not bugs, so they
never show a traceback.
"""

from __future__ import annotations


class AdpulseError(Exception):
    """Root of every error adpulse raises on purpose."""

    exit_code = 1


class ConfigError(AdpulseError):
    """A setting or option has a value adpulse cannot use: fix the variable or flag named."""

    exit_code = 2


class BrokerUnavailable(AdpulseError):
    """No Kafka broker answered at the bootstrap address: start one or fix --bootstrap."""

    exit_code = 3


class BrokerAuthFailed(AdpulseError):
    """The broker refused our SASL login, or its TLS certificate is not trusted: fix the
    ADPULSE_SASL_* or ADPULSE_SSL_* setting named (exit 3, like an unreachable broker)."""

    exit_code = 3


class BrokerStartError(AdpulseError):
    """The embedded broker could not start (port taken, binary missing)."""

    exit_code = 3


class InputError(AdpulseError):
    """An input file is missing or malformed: the message names the file and line."""

    exit_code = 4


class StateError(AdpulseError):
    """Local state (RocksDB directory) cannot be used: the message names the path."""

    exit_code = 5


class ModelRefused(AdpulseError):
    """A model version failed validation at load; the reason says what to fix.

    The registry keeps serving the current version and does not retry the
    refused one until its files change: publish a fixed version under a new name.
    """

    exit_code = 6

    def __init__(self, version: str, reason: str) -> None:
        super().__init__(f"model {version} refused: {reason}")
        self.version = version
        self.reason = reason


class WorkerUnavailable(AdpulseError):
    """A worker's HTTP API did not answer, or answered 503 (recovering, overloaded): retry."""

    exit_code = 8
