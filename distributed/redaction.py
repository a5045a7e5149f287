"""Secrets and redaction: the one set of rules for everything the project prints or saves.

A mapping value is masked (``"***"``) when its key names a credential:

- *strong* names, masked whatever the value's type: secret, password/passwd, token (not
  tokens/tokenizer), credential, api/access/private/session key, bearer, and the exact keys
  fsspec and the clouds use (``key``, ``access_key_id``, ``account_key``, ``sas_token``);
- *weak* names, masked unless the value is a number or a bool (``num_keys: 3`` stays):
  any key containing key/token/cred/pass..., a part (between separators) sk/pwd/pass,
  or an ``AWS_`` prefix.

Strings are scanned as free text: ``user:password@`` in URLs, ``key=value`` /
``"key": "value"`` pairs and ``--flag VALUE`` whose names are strong. Objects with a
``to_dict()`` (the trainer's ``Config``) and dataclasses are redacted as dicts.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"

STRONG_WORDS = (
    r"secret|passw(?:or)?d|passwd|(?<![a-z])token(?!s|iz)|credential|api[_-]?key|"
    r"access[_-]?key|private[_-]?key|session[_-]?key|bearer"
)
"""Credential words as a regex ("max_tokens", "tokenizer", "RAY_AUTH_MODE" are not)."""
_STRONG = re.compile(STRONG_WORDS, re.IGNORECASE)
_STRONG_EXACT = {"key", "access_key_id", "aws_access_key_id", "account_key", "sas_token"}
_WEAK_WORDS = ("secret", "key", "token", "password", "passwd", "cred")
_WEAK_PARTS = ("sk", "pwd", "pass")  # whole parts of a key: ``sk``, ``db_pass``

_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_KV_IN_TEXT = re.compile(
    rf"""(?P<key>[\w.\-]*(?:{STRONG_WORDS})[\w.\-]*)"""
    r"""(?P<sep>["']?\s*[=:]\s*["']?)(?P<value>[^\s"',}]+)""",
    re.IGNORECASE,
)
_FLAG_IN_TEXT = re.compile(
    rf"(?P<key>--[\w\-]*(?:{STRONG_WORDS})[\w\-]*)(?P<sep>\s+)(?P<value>[^\s-]\S*)",
    re.IGNORECASE,
)


def is_credential_name(name: str) -> bool:
    """Does ``name`` (an environment variable, an override's last part) name a credential?"""
    return bool(_STRONG.search(name)) or name.lower() in _STRONG_EXACT


def _weak_name(key: str) -> bool:
    k = key.lower()
    parts = re.split(r"[^a-z0-9]+", k)
    return (
        k.startswith("aws_")
        or any(w in k for w in _WEAK_WORDS)
        or any(p in _WEAK_PARTS for p in parts)
    )


def _masked(key: Any, value: Any) -> bool:
    if not isinstance(key, str) or value is None or value == "":
        return False
    if is_credential_name(key):
        return True
    return _weak_name(key) and not isinstance(value, (bool, int, float))


def redact_url(url: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://***@host/...``."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", url)


def redact_text(text: str) -> str:
    """Free text (entrypoints, log lines) with URL user info and credential-like
    ``key=value`` pairs and ``--flag VALUE`` arguments masked."""
    text = redact_url(text)
    text = _FLAG_IN_TEXT.sub(lambda m: f"{m['key']}{m['sep']}{REDACTED}", text)
    return _KV_IN_TEXT.sub(lambda m: f"{m['key']}{m['sep']}{REDACTED}", text)


def redact(obj: Any) -> Any:
    """A redacted copy of ``obj`` (mappings, lists, tuples, strings, dataclasses, objects
    with ``to_dict()``); the input is left as it is."""
    if hasattr(obj, "to_dict") and not isinstance(obj, type):
        obj = obj.to_dict()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {k: REDACTED if _masked(k, v) else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def mask_values(text: str, values: Iterable[str]) -> str:
    """``text`` with every known secret value (6 characters or more) masked, then
    :func:`redact_text`: for output the rules cannot parse, such as a job's logs."""
    for value in values:
        if value and len(value) >= 6:
            text = text.replace(value, REDACTED)
    return redact_text(text)


__all__ = [
    "REDACTED",
    "STRONG_WORDS",
    "is_credential_name",
    "mask_values",
    "redact",
    "redact_text",
    "redact_url",
]
