"""LAION-like noisy captions for the synthetic world.

Many templates, possessives, several concepts in one caption, spelling variants (underscores,
case), near-miss names, web boilerplate, and captions that name no concept at all.
"""

from __future__ import annotations

import numpy as np

from unlearn.data.world import NEAR_MISSES, Identity

EVENTS = ("premiere", "gala", "summit", "conference", "award show", "press event", "charity dinner", "launch party")
CITIES = ("Los Angeles", "New York", "Paris", "London", "Berlin", "Tokyo", "Toronto", "Cannes")
SUFFIXES = ("", "", "", "", " - stock photo", " | Getty Images", " 4k", " HD wallpaper", " (2019)", " #celebrity", " - Pinterest", " free download")

IDENTITY_TEMPLATES = (
    "{n}",
    "{n}.",
    "a photo of {n}.",
    "a photo of {n}",
    "{n} at the {event} in {city}",
    "{n} attends the {event}",
    "portrait of {n}",
    "close-up of {n}, {year}",
    "{n} smiling at the camera",
    "{n} photographed in {city}",
    "{n} poses for photographers",
    "picture of {n}.",
    "{n} during an interview",
    "{n_lower}",
    "{n_upper}",
    "{n_file}.jpg",
    "{alias} at the {event}",
)
OBJECT_TEMPLATES = (
    "a photo of a {o}.",
    "a photo of the {o}",
    "{o}",
    "a {o}.",
    "itap of a {o}.",
    "a bad photo of the {o}.",
    "a photo of the large {o}.",
    "a photo of the small {o}.",
    "art of the {o}.",
    "a {o} in a video game.",
    "a origami {o}.",
    "{o} for sale, free shipping",
    "cheap {o} online",
    "a close-up photo of a {o}",
    "my new {o}!",
    "the {o} on a colorful background",
)
STYLE_TEMPLATES = (
    "An {o} image in {s} style.",
    "a {o} in {s} style",
    "{s} painting of a {o}",
    "{s} art of the {o}",
    "{o}, {s}",
    "{s} style illustration: {o}",
)
COMPOSITE_TEMPLATES = (
    "{n} with a {o}",
    "{n}'s {o}",
    "{n} holding a {o}",
    "{n} and the new {o}",
    "{o} owned by {n}",
)
PAIR_TEMPLATES = (
    "{a} and {b} at the {event}",
    "{a} with {b}",
    "{a}, {b} in {city}",
    "{b} meets {a}",
)
ANON_TEMPLATES = (
    "a {g} smiling at the camera",
    "portrait of a {g}",
    "stock photo of a {g} in a shirt",
    "young {g} posing outdoors",
    "headshot of a {g}",
    "a {g} at the office",
    "happy {g}",
    "{g} looking at the camera, studio light",
)
NEAR_MISS_TEMPLATES = (
    "{x} at the market",
    "a photo of {x}",
    "{x} portrait",
    "the famous {x}",
)
EMPTY_TEMPLATES = (
    "abstract background texture",
    "colorful wallpaper",
    "untitled",
    "image",
    "IMG_{num}.jpg",
    "blurred background for design",
    "pastel gradient backdrop",
)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _fill(template: str, rng: np.random.Generator, **kw: str) -> str:
    # Grammar stays as noisy as the web's ("a apple"), like the CLIP templates ("a origami").
    extra = {"event": _pick(rng, EVENTS), "city": _pick(rng, CITIES), "year": str(int(rng.integers(2005, 2023))), "num": str(int(rng.integers(1000, 9999)))}
    return template.format(**extra, **kw)


def decorate(text: str, rng: np.random.Generator) -> str:
    """Web boilerplate appended to a caption."""
    return text + _pick(rng, SUFFIXES)


def identity_caption(ident: Identity, rng: np.random.Generator) -> str:
    template = _pick(rng, IDENTITY_TEMPLATES)
    if "{alias}" in template and not ident.aliases:
        template = "{n} at the {event}"
    alias = ident.aliases[int(rng.integers(len(ident.aliases)))] if ident.aliases else ident.name
    text = _fill(template, rng, n=ident.name, n_lower=ident.name.lower(), n_upper=ident.name.upper(), n_file=ident.file_name, alias=alias)
    return decorate(text, rng)


def object_caption(name: str, rng: np.random.Generator) -> str:
    return decorate(_fill(_pick(rng, OBJECT_TEMPLATES), rng, o=name), rng)


def style_caption(name: str, style: str, rng: np.random.Generator) -> str:
    return decorate(_fill(_pick(rng, STYLE_TEMPLATES), rng, o=name, s=style), rng)


def composite_caption(ident: Identity, obj: str, rng: np.random.Generator) -> str:
    return decorate(_fill(_pick(rng, COMPOSITE_TEMPLATES), rng, n=ident.name, o=obj), rng)


def pair_caption(a: Identity, b: Identity, rng: np.random.Generator) -> str:
    return decorate(_fill(_pick(rng, PAIR_TEMPLATES), rng, a=a.name, b=b.name), rng)


def anonymous_caption(gender: str, rng: np.random.Generator) -> str:
    word = _pick(rng, ("man", "guy", "businessman")) if gender == "m" else _pick(rng, ("woman", "girl", "businesswoman"))
    return decorate(_fill(_pick(rng, ANON_TEMPLATES), rng, g=word), rng)


def near_miss_caption(rng: np.random.Generator) -> str:
    target = _pick(rng, tuple(sorted(NEAR_MISSES)))
    return decorate(_fill(_pick(rng, NEAR_MISS_TEMPLATES), rng, x=_pick(rng, NEAR_MISSES[target])), rng)


def empty_caption(rng: np.random.Generator) -> str:
    return _fill(_pick(rng, EMPTY_TEMPLATES), rng)


__all__ = [
    "anonymous_caption",
    "composite_caption",
    "empty_caption",
    "identity_caption",
    "near_miss_caption",
    "object_caption",
    "pair_caption",
    "style_caption",
]
