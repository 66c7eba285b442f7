"""Redis URLs in messages: masking their credentials, and refusing URLs that redis-py would misread.

A URL's password may contain any character. ``urlsplit`` (and so redis-py) ends the authority at
the first ``/``, ``?`` or ``#``, so a raw ``redis://:pa/ss@host`` is read as host ``""``, port
``pa`` and path ``/ss@host``: masking by ``urlsplit`` leaves ``ss`` in the log line, and redis-py
puts ``pa`` into its "port" error. Hence two rules:

- :func:`mask_url` does not parse: the userinfo is everything between ``://`` and the *last*
  ``@`` of the string, whatever it contains, and query parameters named like a secret
  (``password``, ``ssl_password``, ``auth``, ``token``...) are masked up to the next ``&``. When
  the reading is ambiguous (an ``@`` in a query value) it masks more, never less.
- :func:`check_redis_url` refuses a one-server URL that ``urlsplit`` cannot read as
  ``host[:port][/db]``, naming nothing of it, so a misread URL never reaches redis-py.

Standard library only: the config module uses both without importing redis.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

MASK = "***"
# A query parameter whose name says it holds a secret; its value runs to the next & or ; (not #:
# a '#' inside a raw password must not end the masking).
_SECRET_PARAM = re.compile(r"(?:^|[?&;])[^=&;?#]*(?:pass|pwd|secret|token|auth|cred)[^=&;?#]*=([^&;]*)", re.I)
# Characters that cannot be part of a plain user name: if one appears, the whole userinfo is masked.
_NOT_A_USER = re.compile(r"[/?#@\[\]\s]")
_DB_PATH = re.compile(r"^/?\d*$")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_ENCODE_HINT = "percent-encode / ? # % in a password (%2F, %3F, %23, %25)"


def _secret_spans(url: str) -> list[tuple[int, int]]:
    """Character ranges of ``url`` that may hold a credential."""
    spans = [match.span(1) for match in _SECRET_PARAM.finditer(url) if match.end(1) > match.start(1)]
    sep = url.find("://")
    start = sep + 3 if sep >= 0 else 0
    at = url.rfind("@", start)
    if at >= 0:
        userinfo = url[start:at]
        user, colon, _ = userinfo.partition(":")
        if colon and not _NOT_A_USER.search(user):
            spans.append((start + len(user) + 1, at))  # keep "user:", mask the password
        else:
            spans.append((start, at))  # no ':' (a bare password?) or an odd user name: mask it all
    return spans


def mask_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``, fit for logs, errors and ``repr``.

    ``redis://user:pa/ss@h:1/0`` -> ``redis://user:***@h:1/0``; ``redis://:pw@h1:1,h2:2`` (cluster)
    -> ``redis://:***@h1:1,h2:2``; ``redis://h?password=pw`` -> ``redis://h?password=***``.
    """
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for span in _secret_spans(url) if span[1] > span[0]):
        if merged and start <= merged[-1][1]:  # overlapping ranges (a query password holding '@')
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    out, pos = [], 0
    for start, end in merged:
        out += [url[pos:start], MASK]
        pos = end
    out.append(url[pos:])
    return "".join(out)


def redact_text(text: str) -> str:
    """``text`` with every ``scheme://...`` token in it passed through :func:`mask_url`."""
    return _URL_IN_TEXT.sub(lambda match: mask_url(match.group(0)), text)


def check_redis_url(url: str) -> None:
    """Refuse a ``redis://`` / ``rediss://`` URL that is not ``[[user]:password@]host[:port][/db][?options]``
    as redis-py reads it. The ``ValueError`` names no part of the URL (any part may be a password
    fragment); the caller shows the URL through :func:`mask_url`."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"host:port does not parse ({_ENCODE_HINT})") from None
    if not host:
        raise ValueError(f"names no host ({_ENCODE_HINT})")
    if port == 0:
        raise ValueError("port must be 1-65535")
    if not _DB_PATH.match(parts.path):
        raise ValueError(f"path must be /DB, a database number ({_ENCODE_HINT})")
    if parts.fragment or url.endswith("#"):
        raise ValueError(f"a Redis URL has no #fragment ({_ENCODE_HINT})")
