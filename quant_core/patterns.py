"""Module-name patterns (``overrides`` keys and ``modules_to_not_convert`` entries), matched in
time linear in the name's length, whatever the pattern.

A checkpoint's ``config.json`` carries these patterns, so they are untrusted input: Python's
``re`` backtracks, and ``re:(.|.)*z`` against a 40-character name would run for centuries. Here
every pattern is compiled once into a Thompson NFA and simulated state-set by state-set (the
``re2`` approach), so a match costs at most ``len(name) x states`` steps. Three kinds:

* a plain name (no ``*?[``): matches the module of that name, or any module whose dotted name ends
  with ``"." + pattern`` (``"lm_head"`` matches ``"model.lm_head"``);
* an ``fnmatch`` glob (``*``, ``?``, ``[seq]``, ``[!seq]``), matched against the whole name;
* ``"re:"`` followed by a regular expression, matched against the whole name
  (``re.fullmatch`` semantics). Backreferences, lookaround, atomic groups, possessive repeats and
  inline flags are refused: they have no linear-time algorithm.

Limits (a config over them is refused with a message): :data:`MAX_PATTERN_LENGTH` characters per
pattern, :data:`MAX_PATTERNS` patterns per config, of which at most :data:`MAX_SCANNED_PATTERNS`
globs/regexes (plain names are looked up in a dict, so mixed-precision plans with one exact name
per layer stay cheap), and :data:`MAX_STATES` NFA states per pattern.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

try:  # Python 3.11+
    from re import _constants as _c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = [
    "MAX_PATTERN_LENGTH", "MAX_PATTERNS", "MAX_SCANNED_PATTERNS", "MAX_STATES",
    "is_plain", "compile_pattern", "check_pattern", "PatternSet",
]

MAX_PATTERN_LENGTH = 1_000
MAX_PATTERNS = 100_000
MAX_SCANNED_PATTERNS = 1_000
MAX_STATES = 4_000

_GLOB_CHARS = "*?["


def is_plain(pattern: str) -> bool:
    """A plain module name (matched exactly or as a dotted suffix), not a glob or regex."""
    return not pattern.startswith("re:") and not any(c in pattern for c in _GLOB_CHARS)


# ---- a linear-time regular-expression matcher -------------------------------------------------

_CHAR, _SPLIT, _BOL, _EOL, _MATCH = range(5)


class _Nfa:
    """Thompson NFA: parallel lists ``kind``, ``arg`` (a char predicate for _CHAR) and ``out``
    (one successor, or two for _SPLIT)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.kind: list[int] = []
        self.arg: list[Callable[[str], bool] | None] = []
        self.out: list[list[int]] = []

    def add(self, kind: int, out: list[int], arg: Callable[[str], bool] | None = None) -> int:
        if len(self.kind) >= MAX_STATES:
            raise ValueError(
                f"pattern {self.pattern!r} is too complex (over {MAX_STATES} matcher states, e.g. from large "
                "{m,n} repeats); simplify it or list the module names"
            )
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append(out)
        return len(self.kind) - 1


def _unsupported(pattern: str, what: str) -> ValueError:
    return ValueError(
        f"pattern {pattern!r} uses {what}, which piecewise-quant does not support in module-name patterns "
        "(they are matched in linear time, like re2); rewrite it without, or use an fnmatch glob"
    )


def _category(cat: object) -> Callable[[str], bool]:
    table: dict[object, Callable[[str], bool]] = {
        _c.CATEGORY_DIGIT: str.isdecimal,
        _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
        _c.CATEGORY_SPACE: str.isspace,
        _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
        _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
        _c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
    }
    fn = table.get(cat)
    if fn is None:
        raise ValueError(f"unsupported character category {cat}")
    return fn


def _char_class(pattern: str, items: list) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    chars: set[str] = set()
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            chars.add(chr(av))
        elif op is _c.RANGE:
            lo, hi = av
            tests.append(lambda ch, lo=lo, hi=hi: lo <= ord(ch) <= hi)
        elif op is _c.CATEGORY:
            tests.append(_category(av))
        else:
            raise _unsupported(pattern, f"the set item {op}")

    def member(ch: str) -> bool:
        hit = ch in chars or any(t(ch) for t in tests)
        return hit != negate

    return member


def _compile_seq(nfa: _Nfa, seq: Sequence, nxt: int) -> int:
    for op, av in reversed(list(seq)):
        nxt = _compile_item(nfa, op, av, nxt)
    return nxt


def _compile_item(nfa: _Nfa, op: object, av: object, nxt: int) -> int:
    p = nfa.pattern
    if op is _c.LITERAL:
        ch = chr(av)
        return nfa.add(_CHAR, [nxt], lambda c, ch=ch: c == ch)
    if op is _c.NOT_LITERAL:
        ch = chr(av)
        return nfa.add(_CHAR, [nxt], lambda c, ch=ch: c != ch)
    if op is _c.ANY:
        return nfa.add(_CHAR, [nxt], lambda c: c != "\n")
    if op is _c.IN:
        return nfa.add(_CHAR, [nxt], _char_class(p, av))
    if op is _c.SUBPATTERN:
        _group, add_flags, del_flags, sub = av
        if add_flags or del_flags:
            raise _unsupported(p, "inline flags")
        return _compile_seq(nfa, sub, nxt)
    if op is _c.BRANCH:
        _, alternatives = av
        starts = [_compile_seq(nfa, alt, nxt) for alt in alternatives]
        start = starts[-1]
        for s in reversed(starts[:-1]):
            start = nfa.add(_SPLIT, [s, start])
        return start
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
        lo, hi, sub = av
        cur = nxt
        if hi == _c.MAXREPEAT:
            loop = nfa.add(_SPLIT, [])
            body = _compile_seq(nfa, sub, loop)
            nfa.out[loop] = [body, nxt]
            cur = loop
        else:
            for _ in range(hi - lo):
                cur = nfa.add(_SPLIT, [_compile_seq(nfa, sub, cur), cur])
        for _ in range(lo):
            cur = _compile_seq(nfa, sub, cur)
        return cur
    if op is _c.AT:
        if av in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
            return nfa.add(_BOL, [nxt])
        if av in (_c.AT_END, _c.AT_END_STRING):
            return nfa.add(_EOL, [nxt])
        raise _unsupported(p, "word-boundary assertions")
    names = {
        _c.GROUPREF: "a backreference", _c.GROUPREF_EXISTS: "a conditional group",
        _c.ASSERT: "a lookahead/lookbehind", _c.ASSERT_NOT: "a negative lookahead/lookbehind",
    }
    for attr, what in (("ATOMIC_GROUP", "an atomic group"), ("POSSESSIVE_REPEAT", "a possessive repeat")):
        if getattr(_c, attr, None) is op:
            raise _unsupported(p, what)
    raise _unsupported(p, names.get(op, f"the construct {op}"))


def _regex_matcher(pattern: str, regex: str) -> Callable[[str], bool]:
    try:
        parsed = _sre_parse.parse(regex)
    except Exception as exc:  # re.error, RecursionError on absurd nesting, ...
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
    flags = getattr(parsed.state, "flags", 0) & ~(_c.SRE_FLAG_UNICODE)
    if flags:
        raise _unsupported(pattern, "inline flags")
    nfa = _Nfa(pattern)
    final = nfa.add(_MATCH, [])
    start = _compile_seq(nfa, parsed, final)
    kind, arg, out = nfa.kind, nfa.arg, nfa.out

    def closure(states: Iterable[int], pos: int, end: int) -> set[int]:
        seen: set[int] = set()
        stack = list(states)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            k = kind[s]
            if k == _SPLIT:
                stack.extend(out[s])
            elif (k == _BOL and pos == 0) or (k == _EOL and pos == end):
                stack.append(out[s][0])
        return seen

    def match(name: str) -> bool:
        end = len(name)
        current = closure([start], 0, end)
        for i, ch in enumerate(name):
            step = [out[s][0] for s in current if kind[s] == _CHAR and arg[s](ch)]
            if not step:
                return False
            current = closure(step, i + 1, end)
        return final in current

    return match


def _glob_to_regex(glob: str) -> str:
    """``fnmatch.translate`` semantics (``*``, ``?``, ``[seq]``, ``[!seq]``), as a plain regex."""
    import re

    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
            else:
                body = glob[i:j].replace("\\", "\\\\")
                i = j + 1
                if body.startswith("!"):
                    body = "^" + body[1:]
                elif body.startswith("^"):
                    body = "\\" + body
                out.append(f"[{body}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def check_pattern(pattern: object, where: str) -> None:
    """Raise ``ValueError`` (naming ``where``) unless ``pattern`` is a usable module-name pattern."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{where}: a module-name pattern must be a non-empty string; got {pattern!r}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(
            f"{where}: pattern of {len(pattern)} characters is longer than the {MAX_PATTERN_LENGTH} allowed "
            f"({pattern[:40]!r}...)"
        )
    try:
        compile_pattern(pattern)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A ``name -> bool`` matcher for one pattern (compiled once; raises ``ValueError``)."""
    if is_plain(pattern):
        suffix = "." + pattern
        return lambda name: name == pattern or name.endswith(suffix)
    if pattern.startswith("re:"):
        return _regex_matcher(pattern, pattern[3:])
    return _regex_matcher(pattern, _glob_to_regex(pattern))


class PatternSet:
    """Ordered patterns with a first-match look-up: plain names through a dict (any number of them
    costs one look-up per dotted suffix of the name), globs and regexes scanned in order."""

    def __init__(self, patterns: Sequence[str], where: str = "patterns") -> None:
        self.patterns = tuple(patterns)
        if len(self.patterns) > MAX_PATTERNS:
            raise ValueError(f"{where}: {len(self.patterns)} patterns, more than the {MAX_PATTERNS} allowed")
        self._plain: dict[str, list[int]] = {}
        self._scanned: list[tuple[int, Callable[[str], bool]]] = []
        for i, p in enumerate(self.patterns):
            if is_plain(p):
                self._plain.setdefault(p, []).append(i)
            else:
                self._scanned.append((i, compile_pattern(p)))
        if len(self._scanned) > MAX_SCANNED_PATTERNS:
            raise ValueError(
                f"{where}: {len(self._scanned)} glob/regex patterns, more than the {MAX_SCANNED_PATTERNS} allowed; "
                "list exact module names instead (any number of those is cheap)"
            )

    def first(self, name: str) -> int | None:
        """Index of the first pattern that matches ``name``, or ``None``."""
        best: int | None = None
        if self._plain:
            parts = name.split(".")
            for k in range(len(parts)):
                found = self._plain.get(".".join(parts[k:]))
                if found is not None and (best is None or found[0] < best):
                    best = found[0]
        for i, matcher in self._scanned:
            if best is not None and i > best:
                break
            if matcher(name):
                return i
        return best

    def matches(self, name: str) -> bool:
        return self.first(name) is not None

    def matching(self, names: Iterable[str]) -> set[int]:
        """Indices of the patterns that match at least one of ``names``."""
        hit: set[int] = set()
        scanned = self._scanned
        for name in names:
            if self._plain:
                parts = name.split(".")
                for k in range(len(parts)):
                    hit.update(self._plain.get(".".join(parts[k:]), ()))
            for i, matcher in scanned:
                if i not in hit and matcher(name):
                    hit.add(i)
        return hit
