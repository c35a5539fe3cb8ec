"""appliance.toml_lines: key paths of a TOML text mapped to the lines they are written on."""

import json
import re
import tomllib
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.toml_lines import KeyLines, dotted


def lines_of(text: str) -> dict:
    return KeyLines(text).lines


def test_tables_and_keys():
    text = """\
top = 1
[listen]
http = "127.0.0.1:3128"

admin = "127.0.0.1:9090"  # comment
[ tls ]  # spaces in a header
cert = ""
"""
    lines = lines_of(text)
    assert lines[("top",)] == 1
    assert lines[("listen",)] == 2
    assert lines[("listen", "http")] == 3
    assert lines[("listen", "admin")] == 5
    assert lines[("tls",)] == 6
    assert lines[("tls", "cert")] == 7


def test_array_of_tables_are_counted():
    text = """\
[[rule]]
action = "allow"
[[rule]]
[[rule]]
action = "deny"
[rule.extra]
x = 1
"""
    lines = lines_of(text)
    assert lines[("rule", 0)] == 1
    assert lines[("rule", 0, "action")] == 2
    assert lines[("rule", 1)] == 3
    assert lines[("rule", 2)] == 4
    assert lines[("rule", 2, "action")] == 5
    # A sub-table after [[rule]] belongs to the latest rule.
    assert lines[("rule", 2, "extra")] == 6
    assert lines[("rule", 2, "extra", "x")] == 7
    assert lines[("rule",)] == 1


def test_nested_arrays_of_tables_count_per_parent():
    text = """\
[[a]]
[[a.b]]
[[a.b]]
[[a]]
[[a.b]]
k = 1
"""
    lines = lines_of(text)
    assert lines[("a", 0, "b", 0)] == 2
    assert lines[("a", 0, "b", 1)] == 3
    assert lines[("a", 1)] == 4
    assert lines[("a", 1, "b", 0)] == 5
    assert lines[("a", 1, "b", 0, "k")] == 6


def test_dotted_and_quoted_keys():
    text = r"""
a.b.c = 1
x . y = 2
"dot.ted" = 3
'lit.eral'.z = 4
"esc\"aped\u00e9" = 5
[ "quoted header" . 'part' ]
k = 6
"""
    lines = lines_of(text)
    assert lines[("a", "b", "c")] == 2
    assert lines[("a",)] == 2  # a table opened by dotted keys has the line of its first key
    assert lines[("x", "y")] == 3
    assert lines[("dot.ted",)] == 4
    assert lines[("lit.eral", "z")] == 5
    assert lines[('esc"apedé',)] == 6
    assert lines[("quoted header", "part", "k")] == 8
    assert set(lines) >= {p for p in lines if p}  # no empty path


def test_multiline_array_elements_and_traps_inside():
    text = """\
[rule]
src = [
  "10.0.0.0/8",   # fake = "comment with a key"
  # [not.a.table]
  "a]b,c",
  'x = 1',
  ["nested", # comment
   "deeper"],
]
after = true
"""
    lines = lines_of(text)
    assert lines[("rule", "src")] == 2
    assert lines[("rule", "src", 0)] == 3
    assert lines[("rule", "src", 1)] == 5
    assert lines[("rule", "src", 2)] == 6
    assert lines[("rule", "src", 3)] == 7
    assert lines[("rule", "src", 3, 1)] == 8
    assert lines[("rule", "after")] == 10
    assert ("not", "a", "table") not in lines and ("fake",) not in lines


def test_multiline_strings_hide_their_lines():
    text = '''\
a = """
fake = 1
[fake]
an escaped \\""" is no end
"""
b = \'\'\'
[[fake]]
x = 2
\'\'\'
c = """ends with quotes"""""
d = \'\'\'two more\'\'\'\'\'
e = 5
'''
    lines = lines_of(text)
    assert tomllib.loads(text)["c"] == 'ends with quotes""'
    assert lines == {("a",): 1, ("b",): 6, ("c",): 10, ("d",): 11, ("e",): 12}


def test_inline_tables_and_arrays_of_them():
    text = """\
t = { a = 1, b.c = { d = [1, 2] }, "q k" = 'v' }
arr = [
  { name = "one" },
  { name = "two", x = [
      3,
  ] },
]
"""
    lines = lines_of(text)
    assert lines[("t", "a")] == 1
    assert lines[("t", "b", "c", "d", 1)] == 1
    assert lines[("t", "q k")] == 1
    assert lines[("arr", 1)] == 4
    assert lines[("arr", 1, "name")] == 4
    assert lines[("arr", 1, "x", 0)] == 5


def test_dates_and_numbers_are_skipped_as_values():
    text = "d = 1979-05-27 07:32:00Z\nn = [1_000, -0.5e3, inf, 0x1F]\nk = 2\n"
    lines = lines_of(text)
    assert lines[("n", 3)] == 2 and lines[("k",)] == 3


def test_crlf_line_endings():
    text = "[listen]\r\nhttp = [\r\n  'a',\r\n  'b',\r\n]\r\nadmin = 'c'\r\n"
    lines = lines_of(text)
    assert lines[("listen", "http", 1)] == 4
    assert lines[("listen", "admin")] == 6


def test_line_falls_back_to_the_longest_written_prefix():
    text = '[listen]\nhttp = ["a", "b"]\n[[rule]]\n[[rule]]\naction = "x"\n'
    located = KeyLines(text)
    assert located.line(("listen", "http", 1)) == 2  # a one-line array: the key's line
    assert located.line(("listen", "http", 7)) == 2
    assert located.line(("listen", "missing")) == 1  # missing key: its table's header
    assert located.line(("rule", 1, "src")) == 4
    assert located.line(("rule", 5)) == 3  # no such rule: the first [[rule]]
    assert located.line(("nowhere", "x")) is None
    assert located.line(()) is None


def test_bad_text_does_not_raise_and_later_lines_still_count():
    text = """\
garbage here
= 1
[unclosed
k = "unterminated
key = 1
arr = [1, 2
after = 3
[ok]
z = 1
"""
    lines = lines_of(text)
    assert lines[("key",)] == 5
    assert lines[("ok", "z")] == 9


def test_deep_nesting_does_not_recurse_without_bound():
    lines = lines_of("a = " + "[" * 5000 + "]" * 5000 + "\nb = 1\n")
    assert lines[("b",)] == 2


def test_dotted_formats_paths_as_admins_write_them():
    assert dotted(("listen", "http")) == "listen.http"
    assert dotted(("rule", 2, "src", 3)) == "rule[2].src[3]"
    assert dotted(("a b", "c.d", "ok")) == '"a b"."c.d".ok'
    assert dotted(()) == ""


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_is_scanned_without_error(text):
    KeyLines(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='[]{}"\'\n=#.,ab \\'))
def test_toml_punctuation_soup_is_scanned_without_error(text):
    KeyLines(text)


# -- generated documents: render TOML while noting each key's line, then compare -------------------

_CHARS = st.characters(blacklist_categories=("Cs", "Cc"))
_TRAPS = ["x = 1\n[t]\n[[u]]\n", "]", "}", "#", '"', "'", '""', "\\", "a\nb = [1,\n"]
_TEXT = st.text(_CHARS, max_size=8) | st.sampled_from(_TRAPS)
_KEYS = st.from_regex(r"[a-z][a-z0-9_-]{0,4}", fullmatch=True) | st.text(_CHARS, max_size=5)


@dataclass
class Styled:
    """A value and how to write it: lists on one line or one a line, tables inline or dotted."""

    value: object
    style: str


def _strings():
    return st.builds(Styled, _TEXT, st.sampled_from(["basic", "literal", "ml_basic", "ml_literal"]))


def _values():
    scalars = st.integers(-(2**63), 2**63 - 1) | st.booleans()
    leaves = _strings() | st.builds(Styled, scalars, st.just("scalar"))

    def containers(inner):
        lists = st.builds(Styled, st.lists(inner, max_size=3), st.sampled_from(["line", "lines"]))
        tables = st.dictionaries(_KEYS, inner, max_size=3)
        return lists | st.builds(Styled, tables, st.sampled_from(["inline", "dotted"]))

    return st.recursive(leaves, containers, max_leaves=8)


def _plain(styled):
    if isinstance(styled.value, list):
        return [_plain(item) for item in styled.value]
    if isinstance(styled.value, dict):
        return {key: _plain(item) for key, item in styled.value.items()}
    return styled.value


class Writer:
    def __init__(self):
        self.parts, self.line, self.expected = [], 1, {}

    def emit(self, text):
        self.parts.append(text)
        self.line += text.count("\n")

    def mark(self, path):
        self.expected[path] = self.line

    def key(self, key):
        return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)

    def entry(self, table, keys, styled):
        """Writes `keys = value` (keys dotted) on a line of its own."""
        if isinstance(styled.value, dict) and styled.style == "dotted" and styled.value:
            for key, item in styled.value.items():
                self.entry(table, keys + (key,), item)
            return
        self.mark(table + keys)
        self.emit(".".join(self.key(key) for key in keys) + " = ")
        self.value(table + keys, styled, multiline=True)
        self.emit("  # k = 1\n")

    def value(self, path, styled, multiline):
        value, style = styled.value, styled.style
        if isinstance(value, list):
            self.array(path, value, multiline and style == "lines")
        elif isinstance(value, dict):
            self.emit("{")
            for n, (key, item) in enumerate(value.items()):
                self.emit(", " if n else " ")
                self.mark(path + (key,))
                self.emit(f"{self.key(key)} = ")
                self.value(path + (key,), item, multiline=False)  # TOML 1.0: one line
            self.emit(" }")
        elif isinstance(value, str):
            self.emit(self.string(value, style if multiline else "basic"))
        else:
            self.emit(json.dumps(value))

    def array(self, path, items, multiline):
        self.emit("[")
        for index, item in enumerate(items):
            if multiline:
                self.emit("\n  # x = 2\n  ")
            self.mark(path + (index,))
            self.value(path + (index,), item, multiline)
            self.emit(",")
        self.emit("\n]" if multiline else "]")

    @staticmethod
    def string(value, style):
        if style == "ml_basic":
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            return f'"""\n{escaped}"""'
        if style == "ml_literal" and "'''" not in value and not value.endswith("'"):
            return f"'''\n{value}'''"
        if style == "literal" and "'" not in value and "\n" not in value:
            return f"'{value}'"
        return json.dumps(value, ensure_ascii=False)


_TABLE = st.dictionaries(_KEYS, _values(), max_size=4)
# Root keys must not collide with the tables written after them.
_ROOT_KEYS = _KEYS.filter(lambda key: not re.fullmatch(r"t\d+|rule", key))
_ROOT = st.dictionaries(_ROOT_KEYS, _values(), max_size=4)


@settings(max_examples=200, deadline=None)
@given(root=_ROOT, tables=st.lists(_TABLE, max_size=3), rules=st.lists(_TABLE, max_size=3))
def test_generated_documents_are_located_exactly(root, tables, rules):
    writer = Writer()
    for key, styled in root.items():
        writer.entry((), (key,), styled)
    for index, table in enumerate(tables):
        writer.emit("\n")
        writer.mark((f"t{index}",))
        writer.emit(f"[ t{index} ]  # [[no]]\n")
        for key, styled in table.items():
            writer.entry((f"t{index}",), (key,), styled)
    for index, table in enumerate(rules):
        writer.emit("\n")
        writer.mark(("rule", index))
        writer.emit("[[rule]]\n")
        for key, styled in table.items():
            writer.entry(("rule", index), (key,), styled)
    text = "".join(writer.parts)
    document = tomllib.loads(text)  # the renderer itself writes valid TOML ...
    expected = _plain(Styled(root, "dotted"))
    expected |= {f"t{n}": _plain(Styled(table, "dotted")) for n, table in enumerate(tables)}
    if rules:
        expected["rule"] = [_plain(Styled(table, "dotted")) for table in rules]
    assert document == expected  # ... that means what it was meant to
    lines = lines_of(text)
    for path, line in writer.expected.items():
        assert lines.get(path) == line, (path, text)
