"""Pseudonymous user ids: HMAC-SHA256(key, user id), applied where records are decoded.

Apps key ``user-events`` and ``ad-requests`` by their raw user id. The worker
replaces that id by a keyed hash the moment a record is decoded, so state keys,
decisions, feedback labels, logs and metrics only ever hold the pseudonym.
A keyed hash (not a plain hash) because user ids are guessable: without the
key nobody can test "is user 1000040 in this table?".

The pseudonym is the first 32 hex characters (128 bits) of the HMAC. Two of n
users collide with probability about n² / 2¹²⁹: 1.5e-27 for a billion users, so
a collision (two users sharing state) is not a practical concern.

Every worker must use the same key: a user's records are looked up by their
pseudonym, and a worker with another key would start that user afresh. The key
comes from ``ADPULSE_PSEUDONYM_KEY_FILE`` (preferred) or ``ADPULSE_PSEUDONYM_KEY``,
never from a command-line flag (flags show in ``ps``), and is never logged.

>>> p = Pseudonymiser(b"k")
>>> p("1000040")
'1068b16acfb0b75409def253999d2d14'
>>> p("1000040") == p("1000040") != p("1000041")
True
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from adpulse.core.errors import ConfigError
from adpulse.core.settings import Settings

log = logging.getLogger(__name__)

PSEUDONYM_HEX = 32
# Published on purpose: only for the embedded broker (demo, tests), where no real user is.
DEVELOPMENT_KEY = b"adpulse-development-pseudonym-key (not a secret)"
_CACHE_MAX = 1 << 16


class Pseudonymiser:
    """``user id -> pseudonym``; the identity when pseudonymisation is off.

    Results are memoised (up to 65,536 ids, then the memo starts over): hot users
    repeat within and across batches, and a memo hit costs a dict lookup instead
    of an HMAC (~1 us).
    """

    def __init__(self, key: bytes | None) -> None:
        self._key = key
        self._memo: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def __call__(self, user_id: str) -> str:
        if self._key is None:
            return user_id
        got = self._memo.get(user_id)
        if got is None:
            if len(self._memo) >= _CACHE_MAX:
                self._memo.clear()
            digest = hmac.digest(self._key, user_id.encode(), hashlib.sha256)
            got = self._memo[user_id] = digest.hex()[:PSEUDONYM_HEX]
        return got

    def __repr__(self) -> str:  # never the key
        return f"Pseudonymiser(enabled={self.enabled})"

    @classmethod
    def from_settings(cls, settings: Settings, *, warn: bool = False) -> Pseudonymiser:
        """The worker's pseudonymiser; a ConfigError (one line) when no key is configured."""
        if not settings.pseudonymise:
            if warn:
                log.warning("ADPULSE_PSEUDONYMISE=false: raw user ids reach state, logs, topics")
            return cls(None)
        return cls(load_key(settings, warn=warn))


def load_key(settings: Settings, *, warn: bool = False) -> bytes:
    """The pseudonym key: from the key file, else the variable, else the development key."""
    if settings.pseudonym_key_file:
        return read_secret_file(settings.pseudonym_key_file, "ADPULSE_PSEUDONYM_KEY_FILE", "key")
    if settings.pseudonym_key:
        key = settings.pseudonym_key.encode()
        if len(key) < 16:
            msg = f"ADPULSE_PSEUDONYM_KEY has {len(key)} bytes, need >= 16"
            raise ConfigError(msg)
        return key
    if settings.embedded_broker:
        if warn:
            log.warning(
                "no ADPULSE_PSEUDONYM_KEY_FILE: pseudonyms use the published development key "
                "(embedded broker only)"
            )
        return DEVELOPMENT_KEY
    msg = (
        "no pseudonym key: set ADPULSE_PSEUDONYM_KEY_FILE (the same key on every worker), "
        "or ADPULSE_PSEUDONYMISE=false to keep raw user ids"
    )
    raise ConfigError(msg)


API_TOKEN_HELP = (
    "this endpoint needs a bearer token: put one (16 or more bytes) in a file, set "
    "ADPULSE_API_TOKEN_FILE to that file on every worker, and send the header "
    "'Authorization: Bearer TOKEN'"
)


def load_api_token(settings: Settings) -> bytes | None:
    """The bearer token user-data endpoints require, or None when none is configured.

    None leaves those endpoints closed (401), never open: the raw-id lookup maps an
    id to its pseudonym and state, and POST /decide changes a user's caps.
    """
    if not settings.api_token_file:
        return None
    return read_secret_file(settings.api_token_file, "ADPULSE_API_TOKEN_FILE", "token")


def read_secret_file(name: str, variable: str, what: str) -> bytes:
    """A secret's bytes from its file, stripped; a ConfigError (one line) if it is
    unreadable or shorter than 16 bytes."""
    path = Path(name)
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        msg = f"{variable}={path}: cannot read it ({exc.strerror})"
        raise ConfigError(msg) from None
    if len(secret) < 16:
        msg = f"{variable}={path}: {what} has {len(secret)} bytes, need >= 16"
        raise ConfigError(msg)
    return secret


def bearer_ok(token: bytes | None, header: str | None) -> bool:
    """Whether an Authorization header carries the token (constant-time compare)."""
    if token is None or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token)
