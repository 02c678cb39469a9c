"""Does a caption name a phrase?  Word-boundary matching that survives real web text.

A phrase matches a caption case-insensitively, not inside a longer word, with spaces, underscores
and hyphens between its words interchangeable ("Elon Musk", "elon_musk.jpg", "ELON-MUSK").  Real
captions spell the same words in many byte sequences, so the caption and the phrases are compared
at successive levels of folding; the first level at which the caption matches names the *rule*
that made the match, and the curation manifests count captions per rule so that a user sees what
a forget set is made of:

``exact``       the caption as it is.
``normalised``  HTML entities decoded (``&amp;``, ``&eacute;``, ``&#39;``), Unicode NFKC (full-width
                letters, ligatures, no-break spaces), typographic quotes and dashes as their ASCII
                forms ("O’Neal" is "O'Neal"), soft hyphens and zero-width marks removed.
``accents``     also accents folded: combining marks dropped after decomposition, composed or not
                ("Beyoncé", "Beyonce" + U+0301 and "beyonce" are one word), and the Latin letters
                that do not decompose spelled out (ø → o, ł → l, æ → ae, ß → ss).
``url``         any of the above, but only inside a URL ("https://x.org/elon-musk-2019.jpg"): it
                still names the concept (as a file name does) and is counted apart.
``joined``      only with ``joined=True`` (param ``curate.joined``, off by default): the words of a
                phrase written together, bare or as a hashtag or handle ("ElonMusk", "#elonmusk",
                "@elonmusk").  Off, such captions are not matched, and curation counts how many
                there were (``joined_only``) so the switch's effect is visible before it is used.

A caption whose bytes are not UTF-8 reaches this module read as Windows-1252 (see
``unlearn.data.shards.decode_caption``), so "Beyonc\xe9" is still "Beyoncé".
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from dataclasses import dataclass

RULES = ("exact", "normalised", "accents", "url", "joined")
_TYPOGRAPHY = str.maketrans({
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u02bc\u00b4\u0060", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d", "-"),
    "\u200b": " ",
    **dict.fromkeys("\u00ad\u200c\u200d\u2060\ufeff", ""),
})
_LATIN = str.maketrans({"ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ħ": "h", "Ħ": "H", "ı": "i",
                        "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ß": "ss", "ẞ": "SS", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D"})
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_SEP = r"[\s_\-]+"


def normalise(text: str) -> str:
    """HTML entities, NFKC, typographic quotes and dashes, invisible marks (the ``normalised`` level)."""
    return unicodedata.normalize("NFKC", html.unescape(text)).translate(_TYPOGRAPHY)


def fold(text: str) -> str:
    """``normalise`` and accents folded (the ``accents`` level)."""
    decomposed = unicodedata.normalize("NFKD", normalise(text))
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c))).translate(_LATIN)


def _words(phrase: str) -> list[str]:
    return [w for w in re.split(r"[\s_\-]+", phrase.strip()) if w]


@functools.lru_cache(maxsize=4096)
def _regex(phrases: tuple[str, ...], joined: bool = False) -> re.Pattern | None:
    """Any of `phrases` (already at the caption's level), not inside a longer word; with `joined`,
    the joined forms of the phrases of two or more words instead."""
    if joined:
        alternatives = ["[#@]?" + "".join(map(re.escape, w)) for w in map(_words, phrases) if len(w) > 1]
    else:
        alternatives = [_SEP.join(map(re.escape, w)) for w in map(_words, phrases) if w]
    if not alternatives:
        return None
    # [^\W_] is a letter or digit: the phrase may not continue a word on either side
    return re.compile(r"(?<![^\W_])(?:" + "|".join(alternatives) + r")(?![^\W_])", re.IGNORECASE)


@functools.lru_cache(maxsize=256)
def _levels(text: str) -> tuple[str, str, str]:
    return text, normalise(text), fold(text)


@dataclass(frozen=True)
class Match:
    rule: str      # one of RULES
    phrase: str    # the phrase (as given) that matched first in the phrase order


def _search(rx: re.Pattern | None, text: str) -> bool:
    return rx is not None and rx.search(text) is not None


def find(caption: str, phrases: tuple[str, ...], exclude: tuple[str, ...] = (), joined: bool = False) -> Match | None:
    """How `caption` names one of `phrases` (ignoring the `exclude` phrases), or None."""
    levels = _levels(caption)
    for level, (name, text) in enumerate(zip(RULES[:3], levels)):
        at = tuple(_levels(p)[level] for p in phrases)
        if exclude:
            text = _strip(text, tuple(_levels(p)[level] for p in exclude))
        if not _search(_regex(at), text):
            continue
        rule = name if _search(_regex(at), _URL.sub(" ", text)) else "url"
        return Match(rule, next(p for p, a in zip(phrases, at) if _search(_regex((a,)), text)))
    if joined:
        return find_joined(caption, phrases, exclude)
    return None


def find_joined(caption: str, phrases: tuple[str, ...], exclude: tuple[str, ...] = ()) -> Match | None:
    """A joined form of a phrase ("#ElonMusk") in the accent-folded caption, or None."""
    text = _levels(caption)[2]
    at = tuple(fold(p) for p in phrases)
    if exclude:
        text = _strip(text, tuple(fold(p) for p in exclude), joined=True)
    if not _search(_regex(at, joined=True), text):
        return None
    return Match("joined", next(p for p, a in zip(phrases, at) if _search(_regex((a,), joined=True), text)))


def _strip(text: str, exclude: tuple[str, ...], joined: bool = False) -> str:
    for rx in (_regex(exclude), _regex(exclude, joined=True) if joined else None):
        if rx is not None:
            text = rx.sub(" ", text)
    return text
