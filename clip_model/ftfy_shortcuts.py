"""OpenAI's caption clean-up (ftfy, HTML unescaping twice, whitespace collapse, lowercasing), with shortcuts
that skip ftfy where it provably changes none of the text's tokens.

``clean_text`` is the reference behaviour. ``fast_clean`` gives text with the same pre-tokenised words
(whitespace may differ: no CLIP token holds whitespace), several times faster on real captions:
- printable ASCII without an HTML entity is returned lowercased (ftfy's fixers only act on entities, control
  characters and non-ASCII text; public behaviour, no ftfy internals needed);
- the other shortcuts read ftfy's own tables (``ftfy.chardata``, ``ftfy.badness``, ``ftfy.fixes``, and
  CPython's private ``re._parser`` to read ftfy's mojibake regex). These are internals: they are loaded in
  one place (``load_shortcuts``), checked at import against ``ftfy.fix_text`` on probe texts that exercise
  every shortcut, and switched off (same ids, slower: full ftfy) when anything is missing or disagrees.
  Tests force each fallback.
"""

from __future__ import annotations

import html
import re
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import ftfy

_MAX_SEGMENT = 1_000_000  # ftfy fixes longer text in segments: no shortcut there
# Non-printable characters ftfy leaves alone (not in its control-character, width or ligature tables; the
# is_bad gate covers the rest): whitespace the pre-tokeniser skips, zero-width (non-)joiners of emoji and
# Indic text. Line breaks only in ASCII text, where ftfy's per-line processing cannot differ.
_HARMLESS = "\t\x0c\xa0\u200b\u200c\u200d"
_HARMLESS_ASCII = "\t\n\r\x0c"


def clean_text(text: str) -> str:
    """OpenAI's normalisation: ftfy, HTML unescaping twice, whitespace collapse, lowercasing."""
    return after_ftfy(ftfy.fix_text(text))


def after_ftfy(text: str) -> str:
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


_WHITESPACE = re.compile(r"\s+")
_LINES = re.compile(r"[^\n]*\n|[^\n]+").findall  # ftfy's segments: each line with its "\n"
# HTML unescaping (html.unescape's and ftfy's) acts only on an '&' before '#', a letter or a digit (every html5
# entity name starts with a letter): any other '&' ("black & white", "& more") leaves the text as it is.
has_entity = re.compile(r"&[#0-9A-Za-z]").search


def plain_ascii(text: str) -> bool:
    """Printable ASCII without an HTML character reference: OpenAI's clean-up only lowercases it."""
    return text.isascii() and ("&" not in text or not has_entity(text)) and text.isprintable()


# --- reading ftfy's mojibake regex (needs CPython's private re._parser) ---
def _anchor_ranges(op, av, c) -> list[tuple[int, int]] | None:
    """The code-point ranges of the character one item of a parsed `re` pattern must consume, when all are
    non-ASCII; None when the item can match (or skip) without such a character. Raises ValueError for items
    a windowed search may get wrong (end anchors, word boundaries, groups, lookarounds see past a window)."""
    if op is c.LITERAL:
        return [(av, av)] if av >= 128 else None
    if op is c.NOT_LITERAL or op is c.ANY:
        return None
    if op is c.IN:
        ranges = []
        for item_op, item_av in av:
            if item_op is c.LITERAL and item_av >= 128:
                ranges.append((item_av, item_av))
            elif item_op is c.RANGE and item_av[0] >= 128:
                ranges.append(item_av)
            else:  # an ASCII character, a negation or a category (\s, \w): not an anchor
                return None
        return ranges
    if op is c.AT and av in (c.AT_BEGINNING, c.AT_BEGINNING_STRING):  # search(pos=) keeps the real start
        return None
    if op in (c.MAX_REPEAT, c.MIN_REPEAT) and len(av[2]) == 1:
        lo, _, [(item_op, item_av)] = av
        inner = _anchor_ranges(item_op, item_av, c)
        return inner if lo else None
    raise ValueError(f"no windowed search through {op}")


def mojibake_anchors(pattern: re.Pattern) -> tuple[int, re.Pattern, list[Branch] | None] | None:
    """(longest match, a class of anchor characters, the branches) when every match of `pattern` provably holds
    an anchor (each branch is a run of single-character items, one of which only matches non-ASCII characters;
    the narrowest such item's characters are the branch's anchors), else None (also when CPython's private
    `re._parser` is missing or unreadable). A text then matches iff it matches within the longest match of an
    anchor. The branches (None when one cannot be written back exactly) let each be tried at its own anchors."""
    if pattern.flags & re.IGNORECASE:  # case folding maps some non-ASCII letters to ASCII ones
        return None
    try:
        from re import _constants as c
        from re import _parser

        tree = _parser.parse(pattern.pattern, pattern.flags)
        data = tree.data
        branches = data[0][1][1] if len(data) == 1 and data[0][0] is c.BRANCH else [tree]
        anchored = []  # per branch: (the narrowest anchor item's ranges, the characters before it or None)
        for branch in branches:
            candidates = [
                (r, i) for i, (op, av) in enumerate(branch) if (r := _anchor_ranges(op, av, c)) is not None
            ]
            if not candidates:  # this branch can match all-ASCII text
                return None
            ranges, i = min(candidates, key=lambda found: sum(hi - lo + 1 for lo, hi in found[0]))
            anchored.append((ranges, _fixed_width(branch[:i], c)))
        width = tree.getwidth()[1]
        written = _written_branches(branches, anchored, pattern.flags, _parser, c)
    except Exception:  # private module gone or changed shape: no proof, no shortcut
        return None
    if width > 64:
        return None
    anchors = sorted({r for ranges, _ in anchored for r in ranges})
    char_class = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in anchors)
    return width, re.compile(f"[{char_class}]"), written


@dataclass(frozen=True)
class Branch:
    """One branch of a mojibake regex: the code-point ranges of its anchors, how many characters its matches
    hold before the anchor (None: not fixed), and its source on its own."""

    anchors: list[tuple[int, int]]
    offset: int | None
    source: str


def _fixed_width(items, c) -> int | None:
    """How many characters parsed single-character items match (zero-width starts count 0), or None."""
    width = 0
    for op, _ in items:
        if op is c.AT:
            continue
        if op not in (c.LITERAL, c.NOT_LITERAL, c.ANY, c.IN):
            return None
        width += 1
    return width


_CATEGORIES = {
    "SPACE": r"\s",
    "NOT_SPACE": r"\S",
    "DIGIT": r"\d",
    "NOT_DIGIT": r"\D",
    "WORD": r"\w",
    "NOT_WORD": r"\W",
}


def _item_source(op, av, c) -> str:
    """The source of one parsed single-character item (or a repeat of one); ValueError for anything else."""
    char = "\\U{:08x}".format
    if op is c.LITERAL:
        return char(av)
    if op is c.NOT_LITERAL:
        return f"[^{char(av)}]"
    if op is c.ANY:
        return "."
    if op is c.AT and av in (c.AT_BEGINNING, c.AT_BEGINNING_STRING):
        return "^" if av is c.AT_BEGINNING else r"\A"
    if op is c.IN:
        parts = []
        for item_op, item_av in av:
            if item_op is c.NEGATE and not parts:
                parts.append("^")
            elif item_op is c.LITERAL:
                parts.append(char(item_av))
            elif item_op is c.RANGE:
                parts.append(f"{char(item_av[0])}-{char(item_av[1])}")
            elif item_op is c.CATEGORY and str(item_av).removeprefix("CATEGORY_") in _CATEGORIES:
                parts.append(_CATEGORIES[str(item_av).removeprefix("CATEGORY_")])
            else:
                raise ValueError(f"cannot write {item_op} back")
        return "[" + "".join(parts) + "]"
    if op in (c.MAX_REPEAT, c.MIN_REPEAT) and len(av[2]) == 1:
        lo, hi, [(item_op, item_av)] = av
        bound = f"{{{lo},{'' if hi is c.MAXREPEAT else hi}}}"
        return _item_source(item_op, item_av, c) + bound + ("?" if op is c.MIN_REPEAT else "")
    raise ValueError(f"cannot write {op} back")


def _written_branches(branches, anchored, flags: int, parser, c) -> list[Branch] | None:
    """Each branch written back as a pattern of its own, or None unless every one parses back to the very
    items it came from (so a search through some of them finds what the whole pattern finds there)."""

    def plain(x):  # parsed items as nested lists and tuples (sub-patterns have no equality of their own)
        if isinstance(x, parser.SubPattern):
            return [plain(item) for item in x.data]
        return type(x)(map(plain, x)) if isinstance(x, list | tuple) else x

    try:
        written = [
            Branch(ranges, offset, "".join(_item_source(op, av, c) for op, av in branch))
            for branch, (ranges, offset) in zip(branches, anchored)
        ]
        flags &= ~re.VERBOSE
        if all(
            plain(parser.parse(b.source, flags).data) == plain(list(branch))
            for b, branch in zip(written, branches)
        ):
            return written
    except (ValueError, re.error):
        pass
    return None


class MojibakeTest:
    """ftfy's `is_bad(text)`, tried only where a match can be: at each character that every match of a branch
    holds (its anchors, found in ftfy's regex by `mojibake_anchors`), that branch alone, at the one place its
    match would start. The same answer, many times faster on non-ASCII text (most of which holds no anchor)."""

    def __init__(
        self, regex: re.Pattern, window: int, anchors: re.Pattern, branches: list[Branch] | None = None
    ):
        self.regex, self.reach, self.anchors = regex, window - 1, anchors
        # Without the branches: the whole regex, searched around runs of anchors whose windows overlap (<= 2 *
        # reach apart); every match lies within `reach` of its anchor.
        anchor, other = anchors.pattern, "[^" + anchors.pattern[1:]
        self.clusters = (
            None if branches else re.compile(f"{anchor}(?:{other}{{0,{2 * self.reach}}}{anchor})*")
        )
        # With them: anchor -> (branch, characters before its anchor or None), each branch compiled once.
        self._by_anchor: dict[str, tuple[tuple[re.Pattern, int | None], ...]] = {}
        flags = regex.flags & ~re.VERBOSE
        for branch in branches or []:
            entry = (re.compile(branch.source, flags), branch.offset)
            for lo, hi in branch.anchors:
                for code in range(lo, hi + 1):
                    self._by_anchor[chr(code)] = (*self._by_anchor.get(chr(code), ()), entry)

    def __call__(self, text: str) -> bool:
        reach = self.reach
        if self.clusters is not None:
            search = self.regex.search
            return any(
                search(text, max(0, m.start() - reach), m.end() + reach) for m in self.clusters.finditer(text)
            )
        for found in self.anchors.finditer(text):
            at = found.start()
            for branch, offset in self._by_anchor[found.group()]:
                if offset is None:  # (a match holding the anchor lies within reach of it)
                    if branch.search(text, max(0, at - reach), at + reach + 1):
                        return True
                elif at >= offset and branch.match(text, at - offset):
                    return True
        return False


@dataclass(frozen=True)
class Shortcuts:
    """What the fast clean-up knows about ftfy, read from ftfy's own tables."""

    touched: re.Pattern  # a class of the characters a fixer after the mojibake step may change
    quotes: dict[int, str]  # uncurl_quotes: curly quote -> ASCII quote (str.translate table)
    has_quote: re.Pattern  # a class of those quotes
    is_bad: Callable[[str], bool]  # ftfy's mojibake test, the gate of its encoding fix
    unescape_html: Callable[[str], str]  # ftfy's HTML entity fixer
    # A class of every character that can make is_bad true (its anchors) or that a fixer changes (`touched`):
    # text without one is settled by one scan. None when the anchors are unknown (is_bad is ftfy's own).
    suspect: re.Pattern | None = None

    def unchanged(self, text: str) -> bool:
        """True when ftfy, HTML unescaping and whitespace collapse provably leave the text's tokens unchanged:
        no HTML entity, printable but for harmless whitespace/joiners, and past ASCII: NFC, no character a later
        fixer changes, no mojibake by ftfy's own test (the exact gate of its encoding fix)."""
        if len(text) >= _MAX_SEGMENT or has_entity(text):
            return False
        return self._inert(text) and self._settled(text) == text

    def clean(self, text: str) -> str | None:
        """`clean_text(text)` up to whitespace (so the same CLIP tokens), or None where no shortcut applies."""
        if len(text) >= _MAX_SEGMENT or ("\n" in text and has_entity(text)):  # (see below)
            return None
        if "\n" in text and not text.isascii():
            # ftfy fixes each line (with its "\n") on its own, and a mojibake match may differ there (at a
            # line's start, or across a break). Entities are excluded above: ftfy stops unescaping every line
            # after the first one holding "<".
            lines = list(map(self._fix_text, _LINES(text)))
            fixed = None if None in lines else "".join(lines)
        else:
            fixed = self._fix_text(text)
        if fixed is None:
            return None
        return after_ftfy(fixed) if has_entity(fixed) else fixed.lower()

    def _fix_text(self, text: str) -> str | None:
        """`ftfy.fix_text(text)` (one segment) when the only fixers that act are HTML unescaping and
        uncurling quotes, else None. This is ftfy's loop (`fix_and_explain`): each pass unescapes (unless
        the text holds '<'), fixes mojibake (a no-op unless `is_bad`), runs the per-character fixers (no-ops
        on `_inert` text but for quotes) and NFC (a no-op on NFC text), until a pass changes nothing."""
        unescape = "<" not in text and has_entity(text)
        while True:
            unescaped = self.unescape_html(text) if unescape else text
            fixed = self._settled(unescaped)
            if fixed is None or not self._inert(fixed):
                return None
            if fixed == text or (fixed is unescaped and not has_entity(fixed)):
                return fixed  # (or the next pass would change nothing: no entity left, nothing else changed)
            text = fixed

    def _settled(self, text: str) -> str | None:
        """The text after ftfy's encoding fix and per-character fixers when only quotes may change (uncurled),
        else None. ASCII text, and text without a suspect character, is left as it is."""
        if text.isascii() or (self.suspect is not None and not self.suspect.search(text)):
            return text
        if self.is_bad(text):  # ftfy's encoding fix would act
            return None
        if self.has_quote.search(text):  # (str.translate is slow on non-ASCII text)
            text = text.translate(self.quotes)
        return None if self.touched.search(text) else text

    def _inert(self, text: str) -> bool:
        """Printable but for whitespace and joiners that no fixer changes, and NFC (ftfy's last step) leaves
        it alone (other characters a fixer changes: `_settled`)."""
        if text.isascii():  # ftfy's ASCII control characters are all non-printable
            return text.isprintable() or text.translate(_DROP_HARMLESS_ASCII).isprintable()
        body = text[:-1] if text[-1] == "\n" else text  # (a line's own break: no fixer changes "\n")
        return (
            body.isprintable() or body.translate(_DROP_HARMLESS).isprintable()
        ) and unicodedata.is_normalized("NFC", text)


def _char_class(codes) -> re.Pattern:
    """A compiled class matching exactly the given code points (searching it is much faster than a set)."""
    return re.compile("[" + "".join(f"\\U{c:08x}" for c in sorted(codes)) + "]")


_DROP_HARMLESS = dict.fromkeys(map(ord, _HARMLESS))
_DROP_HARMLESS_ASCII = dict.fromkeys(map(ord, _HARMLESS_ASCII))


def load_shortcuts(verify: bool = True) -> Shortcuts | None:
    """Shortcuts read from ftfy's internals, or None (with a warning) when they are missing or disagree with
    `ftfy.fix_text` on the probe texts."""
    try:
        from ftfy import chardata
        from ftfy.badness import BADNESS_RE, is_bad
        from ftfy.fixes import unescape_html

        single, double = chardata.SINGLE_QUOTE_RE, chardata.DOUBLE_QUOTE_RE
        quotes = {c: "'" for c in range(0x10000) if single.match(chr(c))}
        quotes |= {c: '"' for c in range(0x10000) if double.match(chr(c))}
        tables = set(chardata.LIGATURES) | set(chardata.WIDTH_MAP) | set(chardata.CONTROL_CHARS) | set(quotes)
        found = mojibake_anchors(BADNESS_RE)
        bad = is_bad if found is None else MojibakeTest(BADNESS_RE, *found)
        touched = _char_class(tables)
        suspect = None if found is None else re.compile(f"[{found[1].pattern[1:-1]}{touched.pattern[1:-1]}]")
        shortcuts = Shortcuts(touched, quotes, _char_class(quotes), bad, unescape_html, suspect)
    except Exception as e:  # an ftfy without these internals: full ftfy on everything but plain ASCII
        warnings.warn(
            f"ftfy {ftfy.__version__}: clean-up shortcuts off ({e!r}); same ids, slower", stacklevel=2
        )
        return None
    if verify and (wrong := disagreements(shortcuts)):
        warnings.warn(
            f"ftfy {ftfy.__version__}: clean-up shortcuts off, they disagree with ftfy.fix_text on {wrong[:3]!r}; "
            "same ids, slower",
            stacklevel=2,
        )
        return None
    return shortcuts


# Texts that exercise every shortcut and the mojibake test both ways (checked at import, ~1 ms).
PROBES = [
    "a photo of a dog", "Tab\tsep\nline\r\nend", "café naïve Ångström", "Москва фото", "東京の夜景 😀",
    "👨\u200d👩\u200d👧 family\xa0photo", "it’s “quoted” ‘single’", "cafÃ© â€œquotesâ€\x9d", "Ã tête", "Â ",
    "ÃƒÂ©", "sÃ³", "ﬁne ＬＯＵＤ", "e\u0301", "&amp; &lt;b&gt; &eacute; &amp;amp;lt;", "AT&T <b>&amp;</b>",
    "“cafÃ©”", "‘Ã ’", "x\x85y", "\x1b[31mred", "a\x0bb", "тест’s", "€5 ½ ×", "\u2028line", "Ã\xa0la",
]  # fmt: skip


def disagreements(shortcuts: Shortcuts) -> list[str]:
    """Probe texts on which the shortcuts' clean-up or mojibake test differs from ftfy's."""
    from ftfy.badness import is_bad

    words = re.compile(r"\S+").findall  # tokens never hold whitespace: compare whitespace-split words
    wrong = [p for p in PROBES if shortcuts.is_bad(p) != is_bad(p)]
    for p in PROBES:
        fixed = shortcuts.clean(p)
        if fixed is not None and words(fixed) != words(clean_text(p)):
            wrong.append(p)
    return wrong


SHORTCUTS = load_shortcuts()


def fast_clean(text: str) -> str:
    """`clean_text(text)` up to whitespace (the same CLIP tokens), skipping ftfy where it provably changes
    nothing."""
    if plain_ascii(text):
        return text.lower()
    if SHORTCUTS is not None and (fixed := SHORTCUTS.clean(text)) is not None:
        return fixed
    return clean_text(text)


def skips_ftfy(text: str) -> bool:
    """True when `fast_clean` skips ftfy (and HTML unescaping) for this text."""
    if plain_ascii(text):
        return True
    return SHORTCUTS is not None and SHORTCUTS.unchanged(text)
