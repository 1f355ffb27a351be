"""Secrets out of everything shown or stored: the one place URLs and text are redacted.

Every backend's ``location()``, every connection error, manifests, bundles, the
audit log and every message the CLI prints go through :func:`redact_url` or
:func:`redact_text`.  What is secret in a URL:

- the password of its userinfo (``scheme://user:PASSWORD@host``; the user name stays);
- the value of every query parameter whose name says it holds a secret
  (``password``, ``sslpassword``, ``token``, ``secret``, ``access_key``,
  ``api_key``, ``X-Amz-Signature``, ...: any name containing ``pass``, ``pwd``,
  ``secret``, ``token``, ``key``, ``credential``, ``auth`` or ``sig``),
  whatever its case or percent-encoding.

Over-redaction is harmless (``sslkey=/path`` loses its path); a missed secret is not.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

REDACTED = "***"

_SECRET_PARTS = ("pass", "pwd", "secret", "token", "key", "credential", "auth", "sig", "cookie", "session")
# a URL inside free text: scheme://, then anything up to white space or a closing quote/bracket
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>()\[\]{}]*")
# password=..., secret: ... in free text (error messages, notes)
_TEXT_SECRET = re.compile(r"(?i)\b(?P<head>(?:password|passwd|secret|token|aws_secret_access_key)\s*[=:]\s*)"
                          r"(?!\*\*\*)[^\s,;&]+")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def secret_name(name: str) -> bool:
    """Whether a URL query parameter (or option) of this name holds a secret."""
    n = unquote(name).strip().lower()
    return any(part in n for part in _SECRET_PARTS)


def _redact_query(query: str) -> str:
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition("=")
        if eq and value and secret_name(name.replace("+", " ")):
            parts[i] = f"{name}={REDACTED}"
    return "".join(parts)


def redact_url(url: Any) -> str:
    """``url`` (a string or anything whose ``str`` is a URL, such as SQLAlchemy's URL
    rendered with its password) without its password and secret query values."""
    text = url if isinstance(url, str) else _render(url)
    m = re.match(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>.*)$", text, re.S)
    if m is None:
        return text
    scheme, rest = m.group("scheme"), m.group("rest")
    # the authority ends at the first '/', '?' or '#' after the last '@' before them
    split = re.search(r"[/?#]", rest)
    auth_end = split.start() if split else len(rest)
    authority, tail = rest[:auth_end], rest[auth_end:]
    if "@" not in authority and split is not None and "@" in rest.partition("?")[0]:
        # an unescaped '/' or '?' in a password: the userinfo runs to the last '@' before the host
        q = rest.find("?")
        at = rest.rfind("@", 0, q if q >= 0 else len(rest))
        host_split = re.search(r"[/?#]", rest[at + 1:])
        auth_end = at + 1 + (host_split.start() if host_split else len(rest) - at - 1)
        authority, tail = rest[:auth_end], rest[auth_end:]
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        authority = f"{user}:{REDACTED}@{host}" if colon else f"{user}@{host}"
    path, qmark, rest_q = tail.partition("?")
    if qmark:
        query, hashmark, fragment = rest_q.partition("#")
        tail = f"{path}?{_redact_query(query)}{hashmark}{_redact_query(fragment) if hashmark else ''}"
    return scheme + authority + tail


def _render(url: Any) -> str:
    render = getattr(url, "render_as_string", None)
    return render(hide_password=False) if render is not None else str(url)


def _redact_match(m: re.Match) -> str:
    url = m.group(0)
    # punctuation ending a sentence is the message's, not the URL's
    body = url.rstrip(".,:;!?")
    return redact_url(body) + url[len(body):]


def redact_text(text: str) -> str:
    """Free text (an error message, a note) with every URL redacted and ``password=...``
    style secrets and AWS access key ids removed."""
    text = _URL_IN_TEXT.sub(_redact_match, text)
    text = _TEXT_SECRET.sub(lambda m: m.group("head") + REDACTED, text)
    return _AWS_KEY_ID.sub(REDACTED, text)
