"""Makes names from a model safe to print: control characters spelled out, never interpreted.

Node names, tags, signature keys and asset names come from the model, which may be hostile: a
newline in one would forge a second output line ("graphrewrite: rewrote 1 site(s), verified OK"
after a refusal), an ANSI escape would move a terminal's cursor or recolour what follows, and a
bidirectional override would reorder what a reader sees. Every text line the tool prints passes
through ``printable``; JSON output stays exact (its encoder escapes control characters itself).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and bidirectional controls.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: Any) -> Any:
    """``value`` with unsafe characters in its strings spelled out (``\\x1b``, ``\\u202e``),
    recursively through mappings, lists and tuples."""
    if isinstance(value, str):
        return _UNSAFE.sub(_escape, value)
    if isinstance(value, Mapping):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(printable(v) for v in value)
    return value
