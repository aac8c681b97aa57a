"""No secret leaves the machine it was typed on: passwords in URLs are masked in what kdsweep
writes.

A storage or tracking URL may carry a password (``postgresql://user:PASSWORD@host/db``) or a
token in its query (``?password=...``, ``?token=...``). kdsweep needs the real URL to connect,
and masks it in everything it records or shows: MLflow params, tags and artifacts, the report,
Optuna user attrs, progress lines and error messages. Masking works on any text, so a URL quoted
inside a library's error message is caught too.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# user:password@ in any scheme://... (the user is kept: it says which account, not how to log in)
# (up to the authority's last "@": a password with an unencoded "@" is masked whole)
_USERINFO = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*:)(?P<secret>[^\s/]+)(?=@[^\s@/]*(?:[/?#\s]|$))"
)
# password=..., token=... in a query string or a key=value text
_QUERY = re.compile(
    r"(?P<head>[?&;]?\b(?:password|passwd|pwd|token|secret|api_key|apikey|access_key)=)(?P<secret>[^&\s;'\"]+)",
    re.I,
)


def redact(text: str) -> str:
    """``text`` with every URL password and secret query value replaced by ``***``."""
    text = _USERINFO.sub(lambda m: m["head"] + MASK, text)
    return _QUERY.sub(lambda m: m["head"] + MASK, text)


def redact_tree(value: Any) -> Any:
    """Every string in a tree of dicts, lists and tuples, redacted (for a resolved study)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(item) for item in value)
    return value
