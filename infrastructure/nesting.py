"""How deep a JSON text nests, told without parsing it.

The standard library's JSON reader recurses once per level of nesting, down to the
interpreter's recursion limit on a deep enough text; near that limit, any Python code the
collector runs meanwhile (another object's finalizer) finds no stack left and fails.
Callers that read with it (HTTP bodies: integers of any size kept exact, repeated members
refused; a gateway's answers) ask here first.
"""

from __future__ import annotations

import json
import re

#: How deep a body's arrays and objects may nest: far more than any command has (a batch's
#: items' fields are four levels down, their lists six), and far short of the recursion
#: limit.
MAX_NESTING = 64

#: A JSON string, escapes and all (written as an unrolled loop: no backtracking).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: Bytes of brackets, as ``[`` and ``]`` whether of arrays or objects (nesting is all that
#: is counted), and everything else deleted.
_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = ord("[")


def json_text(body: bytes) -> str:
    """``body`` as text, in the encoding JSON's reader would take it in (UTF-8, with or
    without a byte order mark, UTF-16 or UTF-32): scanned as bytes, a UTF-16 body's
    characters hold bracket and quote bytes. Raises ``UnicodeDecodeError``."""
    return body.decode(json.detect_encoding(body), "surrogatepass")


def nested_deeper_than(text: str, limit: int) -> bool:
    """Whether ``text``'s arrays and objects nest more than ``limit`` deep (brackets in
    strings do not count). A text with fewer than ``limit`` brackets in all is not scanned;
    in one that is, only its brackets are walked (strings and the rest dropped at C speed),
    and the walk stops as soon as it is deeper. (An unbalanced text is left to the parser,
    which refuses it.)"""
    if text.count("[") + text.count("{") <= limit:
        return False
    outside = _STRING.sub("", text) if '"' in text else text
    brackets = outside.encode("utf-8", "surrogatepass").translate(_SQUARE, _NOT_BRACKETS)
    depth = 0
    for bracket in brackets:
        if bracket == _OPEN:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
