"""How deep a JSON text nests, told without parsing it.

The standard library's JSON reader recurses once per level of nesting, down to the
interpreter's recursion limit on a deep enough text; near that limit, any Python code the
collector runs meanwhile (another object's finalizer) finds no stack left and fails.
Callers that must read with it (HTTP bodies: integers of any size kept exact) ask here
first.
"""

from __future__ import annotations

import re

#: How deep a body's arrays and objects may nest: far more than any command has (a batch's
#: items' fields are four levels down, their lists six), and far short of the recursion
#: limit.
MAX_NESTING = 64

_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def nested_deeper_than(body: bytes, limit: int) -> bool:
    """Whether ``body``'s arrays and objects nest more than ``limit`` deep (brackets in
    strings do not count). Most bodies have fewer brackets than ``limit`` in all, and are
    not scanned."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth, in_string, escaped = 0, False, -1
    for found in _STRUCTURE.finditer(body):
        at = found.start()
        char = body[at]
        if in_string:
            if at == escaped:  # the byte after a backslash
                continue
            if char == 0x5C:  # backslash
                escaped = at + 1
            elif char == 0x22:  # quote
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif char in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False
