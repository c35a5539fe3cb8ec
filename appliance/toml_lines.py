"""Where each key of a TOML text is written, by line: the locator behind config error messages.

`tomllib` returns plain dicts and keeps no positions, so `appliance.config` could say *what* is
wrong but not *where*. This module scans the source text a second time, sans-I/O (text in, a
mapping out), following the TOML 1.0 grammar just far enough to know where table headers, keys and
array elements start. Values are skipped by their real grammar (all four string kinds, nested and
multi-line arrays, inline tables), so a line inside a multi-line array or string that happens to
look like `key = value` is never taken for a key.

Paths are tuples as `tomllib`'s result is indexed: `("listen", "http")`, `("rule", 2, "src", 3)`
(the fourth element of `src` in the third `[[rule]]`). The scanner never raises: on text that
`tomllib` would reject, it gives up on the current line and carries on with the next one.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable

KeyPath = tuple[str | int, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# A scalar (number, boolean, date-time) runs to the next delimiter; date-times may hold a space.
_SCALAR = re.compile(r"[^,\]}#\r\n]+")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", "e": "\x1b"}
_ESCAPES |= {'"': '"', "\\": "\\"}
# Deeper nesting than this is not a config; the limit keeps recursion far from Python's own.
_MAX_DEPTH = 64


class KeyLines:
    """The 1-based line of every table, key and array element written in one TOML text."""

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = _Scanner(text).run()

    def line(self, path: Iterable[str | int]) -> int | None:
        """The line of `path`, else of its longest prefix written in the text, else None.

        The fallback is what error messages want: a missing key is reported on its table's
        header, an element of a one-line array on the array's key.
        """
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def dotted(path: Iterable[str | int]) -> str:
    """A path as an admin points at it: ("rule", 2, "src") -> "rule[2].src"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            out += f".{name}" if out else name
    return out


class _Unreadable(Exception):
    """The text does not follow the grammar here; the scanner skips to the next line."""


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.newlines = [m.start() for m in re.finditer("\n", text)]
        self.found: dict[KeyPath, int] = {}
        self.table: KeyPath = ()
        # How many [[x]] headers each array-of-tables path has had so far: the next index.
        self.counts: dict[KeyPath, int] = {}

    def run(self) -> dict[KeyPath, int]:
        while True:
            self.skip_blank()
            if self.pos >= len(self.text):
                return self.found
            try:
                self.statement()
            except _Unreadable:
                # The statement began past any newline (skip_blank), so this always moves on.
                self.skip_line()

    def statement(self) -> None:
        if self.text.startswith("[[", self.pos):
            self.header(array=True)
        elif self.text.startswith("[", self.pos):
            self.header(array=False)
        else:
            self.key_value(self.table, depth=0)
        self.end_of_line()

    # -- positions -------------------------------------------------------------------------------

    def line_now(self) -> int:
        return bisect.bisect_left(self.newlines, self.pos) + 1

    def record(self, path: KeyPath, line: int) -> None:
        # Every prefix too, so a table opened only by dotted keys (`a.b = 1`) has a line.
        # The first writing wins: that is where an admin looks for a duplicate.
        for n in range(1, len(path) + 1):
            self.found.setdefault(path[:n], line)

    # -- tables and keys -------------------------------------------------------------------------

    def header(self, array: bool) -> None:
        line = self.line_now()
        self.pos += 2 if array else 1
        keys = self.keys()
        self.skip_space()
        closing = "]]" if array else "]"
        if not self.text.startswith(closing, self.pos):
            raise _Unreadable
        self.pos += len(closing)
        self.table = self.resolve(keys, array)
        self.record(self.table, line)

    def resolve(self, keys: list[str], array: bool) -> KeyPath:
        """The path of a header, with the index of each array of tables it passes through."""
        path: KeyPath = ()
        for n, key in enumerate(keys, start=1):
            path += (key,)
            if array and n == len(keys):
                index = self.counts.get(path, 0)
                self.counts[path] = index + 1
                path += (index,)
            elif path in self.counts:
                # `[rule.x]` after `[[rule]]` belongs to the latest rule.
                path += (self.counts[path] - 1,)
        return path

    def key_value(self, table: KeyPath, depth: int) -> None:
        self.skip_space()
        line = self.line_now()
        path = table + tuple(self.keys())
        self.skip_space()
        if not self.eat("="):
            raise _Unreadable
        self.record(path, line)
        self.value(path, depth)

    def keys(self) -> list[str]:
        keys = [self.simple_key()]
        while True:
            self.skip_space()
            if not self.eat("."):
                return keys
            keys.append(self.simple_key())

    def simple_key(self) -> str:
        self.skip_space()
        if self.text.startswith('"', self.pos):
            return self.basic_string()
        if self.text.startswith("'", self.pos):
            return self.literal_string()
        match = _BARE_KEY.match(self.text, self.pos)
        if not match:
            raise _Unreadable
        self.pos = match.end()
        return match.group()

    # -- values ----------------------------------------------------------------------------------

    def value(self, path: KeyPath, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _Unreadable
        self.skip_space()
        text, pos = self.text, self.pos
        if text.startswith('"""', pos) or text.startswith("'''", pos):
            self.multiline_string(text[pos] * 3)
        elif text.startswith('"', pos):
            self.basic_string()
        elif text.startswith("'", pos):
            self.literal_string()
        elif text.startswith("[", pos):
            self.array(path, depth + 1)
        elif text.startswith("{", pos):
            self.inline_table(path, depth + 1)
        else:
            match = _SCALAR.match(text, pos)
            if not match:
                raise _Unreadable
            self.pos = match.end()

    def array(self, path: KeyPath, depth: int) -> None:
        self.pos += 1
        index = 0
        while True:
            self.skip_blank()  # arrays may span lines and hold comments
            if self.eat("]"):
                return
            self.record(path + (index,), self.line_now())
            self.value(path + (index,), depth)
            index += 1
            self.skip_blank()
            if not self.eat(","):
                if self.eat("]"):
                    return
                raise _Unreadable

    def inline_table(self, path: KeyPath, depth: int) -> None:
        self.pos += 1
        while True:
            # TOML 1.0 keeps inline tables on one line; accepting newlines (as TOML 1.1 does)
            # costs nothing here, since tomllib has already judged the text.
            self.skip_blank()
            if self.eat("}"):
                return
            self.key_value(path, depth)
            self.skip_blank()
            if not self.eat(","):
                if self.eat("}"):
                    return
                raise _Unreadable

    def basic_string(self) -> str:
        """A one-line "..." string, decoded: quoted keys are compared with tomllib's keys."""
        text, pos, out = self.text, self.pos + 1, []
        while pos < len(text):
            char = text[pos]
            if char == '"':
                self.pos = pos + 1
                return "".join(out)
            if char == "\n":
                break
            if char == "\\":
                char, pos = self.escape(pos)
            else:
                pos += 1
            out.append(char)
        raise _Unreadable

    def escape(self, pos: int) -> tuple[str, int]:
        code = self.text[pos + 1 : pos + 2]
        if code in _ESCAPES:
            return _ESCAPES[code], pos + 2
        width = {"x": 2, "u": 4, "U": 8}.get(code)
        digits = self.text[pos + 2 : pos + 2 + width] if width else ""
        if not width or not re.fullmatch(r"[0-9A-Fa-f]+", digits) or len(digits) != width:
            raise _Unreadable
        number = int(digits, 16)
        if number > 0x10FFFF:
            raise _Unreadable
        return chr(number), pos + 2 + width

    def literal_string(self) -> str:
        end = self.text.find("'", self.pos + 1)
        newline = self.text.find("\n", self.pos + 1)
        if end < 0 or 0 <= newline < end:
            raise _Unreadable
        value = self.text[self.pos + 1 : end]
        self.pos = end + 1
        return value

    def multiline_string(self, delimiter: str) -> None:
        text, pos = self.text, self.pos + 3
        while pos < len(text):
            if delimiter == '"""' and text[pos] == "\\":
                pos += 2  # an escaped quote does not close the string
            elif text.startswith(delimiter, pos):
                # Up to two quotes may end the content right before the closing delimiter.
                end = pos + 3
                while end < min(len(text), pos + 5) and text[end] == delimiter[0]:
                    end += 1
                self.pos = end
                return
            else:
                pos += 1
        raise _Unreadable

    # -- blanks ----------------------------------------------------------------------------------

    def eat(self, token: str) -> bool:
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def skip_blank(self) -> None:
        """Skips spaces, newlines and comments."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\r\n":
                self.pos += 1
            elif char == "#":
                self.skip_line()
            else:
                return

    def end_of_line(self) -> None:
        self.skip_space()
        if self.pos < len(self.text) and self.text[self.pos] not in "#\r\n":
            raise _Unreadable

    def skip_line(self) -> None:
        """Moves to the end of the line; the newline itself is left to `skip_blank`."""
        newline = self.text.find("\n", self.pos)
        self.pos = len(self.text) if newline < 0 else newline
