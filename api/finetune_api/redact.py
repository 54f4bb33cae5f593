"""URIs as they may be shown: without user-info, query string or fragment.

A URI in a spec may carry a secret: ``https://user:password@host/model``, or a presigned
``...?X-Amz-Signature=...``.  The trainer needs it whole; a status message, an Event, the web
page or a log line must not repeat it.  Both the operator and the trainer pass what they show
through ``redact``.
"""

from __future__ import annotations

import re

# scheme://[userinfo@]rest[?query][#fragment]; each part stops where a URI in prose ends
# (white space, quotes, angle brackets); punctuation that ends a sentence stays.
_END = r"""(?=[.,;:)\]]*(?:[\s'"<>]|$))"""
_URI = re.compile(
    r"""(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)"""
    # user:password@ where the password holds '/' or '@' as people type them (unencoded): a user
    # (no '/', ':' or '@') and a ':' not followed by a port, then all up to the last '@'; else
    # plain user-info up to the last '@' of the authority.
    r"""(?P<userinfo>[^\s/?#@'"<>:]+:(?![0-9]+(?:[/?#'"<>\s]|$))[^\s'"<>]*@|[^\s/?#'"<>]*@)?"""
    r"""(?P<rest>[^\s?#'"<>]*?)"""
    r"""(?P<query>\?[^\s#'"<>]*?)?"""
    r"""(?P<fragment>\#[^\s'"<>]*?)?""" + _END
)


def _strip(match: re.Match[str]) -> str:
    return match["scheme"] + match["rest"]


def redact(text: str) -> str:
    """``text`` with the user-info, query string and fragment of every URI in it removed."""
    if "://" not in text:
        return text
    return _URI.sub(_strip, text)
