"""Redaction of secrets before anything is logged.

Config values whose key looks like a secret (token, password, secret, key) become ``***``, and
passwords inside URLs (``scheme://user:pass@host``) are masked, in params, in the logged
``config.yaml`` and in the tracker's own log messages.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
_SECRET_WORDS = frozenset(
    {"token", "password", "passwd", "secret", "key", "apikey", "credential", "credentials"}
)


def is_secret_key(key: str) -> bool:
    """True when the last dotted component of ``key`` contains a secret-like word.

    Words are split on ``_``, ``-`` and camelCase: ``tracking.api_key``, ``hfToken`` and
    ``db.PASSWORD`` are secrets; ``checkpoint.keep_last`` and ``data.shards`` are not.
    """
    last = key.rsplit(".", 1)[-1]
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", last)
    words = {w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w}
    return bool(words & _SECRET_WORDS) or last.lower() in _SECRET_WORDS


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a flat mapping with the values of secret-looking keys replaced by ``***`` and
    passwords inside URLs (``scheme://user:pass@host``) masked."""
    return {
        k: (REDACTED if is_secret_key(k) and v not in (None, "") else mask_url(v))
        for k, v in params.items()
    }


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)[^@/\s]+@")


def mask_url(value: Any) -> Any:
    """``http://user:secret@host`` -> ``http://user:***@host``; other values unchanged."""
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{REDACTED}@", value)
    return value
