"""Princeton WordNet `data.*` / `index.*` files: every lemma (the `wordnet` source of the query list)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from pipelines.wit.io import expand_inputs, open_input

_WORDNET_POS = ("noun", "verb", "adj", "adv")


def read_wordnet_lemmas(uris: Iterable[str], errors: Counter | None = None) -> list[str]:
    """Every lemma of every synset in Princeton WordNet `data.*` files (folders are searched for them).

    A data line is `offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt ...`;
    license lines start with two spaces. Adjective markers like `(a)` are removed, `_` becomes a space.
    Without `data.*` files, the lemmas of the `index.*` files (first field of each line) are used - the
    same set of words, since every lemma of every synset has an index entry.
    """
    errors = errors if errors is not None else Counter()
    files = expand_inputs(list(uris))
    names = [f.rsplit("/", 1)[-1] for f in files]
    data = [f for f, n in zip(files, names) if n.startswith("data.") and n.split(".")[1] in _WORDNET_POS]
    index = [f for f, n in zip(files, names) if n.startswith("index.") and n.split(".")[1] in _WORDNET_POS]
    lemmas: list[str] = []
    for uri in data or index:
        with open_input(uri) as fh:
            for raw in fh:
                if raw.startswith(b"  ") or not raw.strip():
                    continue
                try:
                    parts = raw.decode("utf-8").split(" ")
                    if data:
                        words = parts[4 : 4 + 2 * int(parts[3], 16) : 2]
                    else:
                        words = [parts[0]]
                        int(parts[2])  # synset_cnt: checks the line has the index layout
                except (UnicodeDecodeError, ValueError, IndexError):
                    errors["malformed_line"] += 1
                    continue
                lemmas += [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words]
    return lemmas
