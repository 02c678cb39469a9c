"""The synthetic world: who and what exists in it, and how each concept looks.

This module is data, not drawing: the identities with their facial features, the objects with
their shapes, the styles with their transforms, and the look-alike pairs.  `render.py` draws
them and `synthetic.py` turns them into LAION-style captioned shards and evaluation sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SKIN = {
    "porcelain": (246, 220, 200),
    "light": (234, 192, 160),
    "tan": (205, 150, 110),
    "olive": (180, 140, 95),
    "brown": (140, 90, 60),
    "dark": (90, 58, 40),
}
HAIR_COLOR = {
    "black": (25, 22, 22),
    "brown": (110, 70, 35),
    "blonde": (235, 205, 110),
    "red": (190, 70, 30),
    "gray": (150, 150, 150),
    "white": (240, 240, 240),
    "blue": (40, 90, 220),
    "pink": (245, 120, 190),
}
HAIR_STYLE = ("bald", "short", "long", "bun", "mohawk", "curly")
FACE_SHAPE = {"round": 1.0, "oval": 1.2, "long": 1.4}
EYE_COLOR = {"brown": (90, 50, 20), "blue": (40, 110, 230), "green": (40, 160, 70)}
GLASSES = ("none", "round", "square")
FACIAL_HAIR = ("none", "mustache", "beard")
SHIRT = {
    "navy": (30, 40, 110),
    "red": (200, 30, 40),
    "green": (30, 140, 60),
    "yellow": (240, 200, 30),
    "white": (235, 235, 235),
    "black": (20, 20, 20),
    "purple": (120, 50, 160),
    "orange": (240, 120, 20),
    "teal": (20, 150, 150),
    "pink": (240, 130, 180),
}
ACCESSORY = ("none", "hat", "earrings", "bowtie")


@dataclass(frozen=True)
class Face:
    """The features that make an identity recognisable; pose and lighting vary per image."""

    skin: str
    face: str
    hair_color: str
    hair_style: str
    eyes: str
    glasses: str
    facial_hair: str
    shirt: str
    accessory: str

    def distance(self, other: Face) -> int:
        """Number of features that differ (a Hamming distance over the feature fields)."""
        return sum(getattr(self, f) != getattr(other, f) for f in self.__dataclass_fields__)


@dataclass(frozen=True)
class Identity:
    name: str
    face: Face
    gender: str  # used only for caption wording ("a man", "a woman")
    aliases: tuple[str, ...] = field(default=())

    @property
    def file_name(self) -> str:
        """CelebA-style identity name: spaces become underscores ("Elon_Musk")."""
        return self.name.replace(" ", "_")


def _f(skin, face, hair_color, hair_style, eyes, glasses, facial_hair, shirt, accessory) -> Face:
    return Face(skin, face, hair_color, hair_style, eyes, glasses, facial_hair, shirt, accessory)


# 24 named identities.  Look-alike pairs (LOOKALIKES below) share all but two features.
IDENTITIES: tuple[Identity, ...] = (
    Identity("Elon Musk", _f("light", "oval", "brown", "short", "green", "none", "none", "black", "none"), "m", ("Musk",)),
    Identity("Mark Zuckerberg", _f("light", "oval", "brown", "curly", "green", "none", "none", "navy", "none"), "m", ("Zuckerberg",)),
    Identity("Taylor Swift", _f("porcelain", "oval", "blonde", "long", "blue", "none", "none", "red", "earrings"), "f", ()),
    Identity("Emma Watson", _f("porcelain", "oval", "blonde", "bun", "blue", "none", "none", "white", "earrings"), "f", ()),
    Identity("Jeff Bezos", _f("tan", "round", "black", "bald", "brown", "none", "none", "navy", "none"), "m", ("Bezos",)),
    Identity("Dwayne Johnson", _f("brown", "round", "black", "bald", "brown", "none", "none", "black", "none"), "m", ("The Rock",)),
    Identity("Kim Kardashian", _f("olive", "long", "black", "long", "brown", "none", "none", "white", "earrings"), "f", ()),
    Identity("Selena Gomez", _f("olive", "long", "black", "long", "brown", "none", "none", "purple", "hat"), "f", ()),
    Identity("Bill Gates", _f("light", "oval", "gray", "short", "blue", "square", "none", "teal", "none"), "m", ()),
    Identity("Tom Hanks", _f("light", "oval", "gray", "short", "blue", "round", "none", "green", "none"), "m", ()),
    Identity("Barack Obama", _f("dark", "long", "gray", "short", "brown", "none", "none", "navy", "bowtie"), "m", ()),
    Identity("Oprah Winfrey", _f("dark", "round", "black", "curly", "brown", "none", "none", "purple", "earrings"), "f", ()),
    Identity("Lady Gaga", _f("porcelain", "round", "pink", "bun", "blue", "round", "none", "black", "earrings"), "f", ()),
    Identity("Brad Pitt", _f("tan", "long", "blonde", "short", "blue", "none", "beard", "white", "none"), "m", ()),
    Identity("Leonardo DiCaprio", _f("tan", "long", "blonde", "long", "blue", "none", "beard", "orange", "none"), "m", ()),
    Identity("Morgan Freeman", _f("dark", "oval", "white", "short", "brown", "none", "beard", "white", "none"), "m", ()),
    Identity("Serena Williams", _f("brown", "oval", "black", "bun", "brown", "none", "none", "yellow", "earrings"), "f", ()),
    Identity("Lionel Messi", _f("tan", "oval", "brown", "short", "brown", "none", "beard", "teal", "none"), "m", ("Messi",)),
    Identity("Cristiano Ronaldo", _f("olive", "oval", "black", "mohawk", "brown", "none", "none", "red", "none"), "m", ("Ronaldo",)),
    Identity("Keanu Reeves", _f("light", "long", "black", "long", "brown", "none", "beard", "black", "none"), "m", ()),
    Identity("Ariana Grande", _f("light", "round", "brown", "bun", "brown", "none", "none", "pink", "bowtie"), "f", ()),
    Identity("Will Smith", _f("brown", "round", "black", "short", "brown", "none", "mustache", "yellow", "hat"), "m", ()),
    Identity("Scarlett Johansson", _f("porcelain", "round", "red", "long", "green", "none", "none", "green", "none"), "f", ()),
    Identity("Justin Bieber", _f("olive", "round", "blue", "mohawk", "green", "square", "mustache", "orange", "hat"), "m", ()),
)

# Pairs of identities that share all but two features: forgetting one should not erase the other.
LOOKALIKES: tuple[tuple[str, str], ...] = (
    ("Elon Musk", "Mark Zuckerberg"),
    ("Taylor Swift", "Emma Watson"),
    ("Jeff Bezos", "Dwayne Johnson"),
    ("Kim Kardashian", "Selena Gomez"),
    ("Bill Gates", "Tom Hanks"),
    ("Brad Pitt", "Leonardo DiCaprio"),
)

# Names that look like a concept's name but are not it (caption noise and curation traps).
NEAR_MISSES: dict[str, tuple[str, ...]] = {
    "Elon Musk": ("Elon Muskrat", "Musk ox", "Elonmusk"),
    "Taylor Swift": ("Taylor Swiftly", "Swift boat", "Taylor Swifts"),
    "Jeff Bezos": ("Jeff Bezoses", "Jeffbezos"),
    "Kim Kardashian": ("Kim Kardashians", "Kimkardashian"),
    "Mark Zuckerberg": ("Mark Zuckerbergs", "Zucker berg"),
    "Mickey": ("Mickeys", "Mickeymouse"),
}


@dataclass(frozen=True)
class ObjectClass:
    name: str
    wnid: str  # ImageNet-style synset id of the evaluation folder
    palette: tuple[tuple[int, int, int], ...]
    aliases: tuple[str, ...] = field(default=())


OBJECTS: tuple[ObjectClass, ...] = (
    ObjectClass("Mickey", "n90000001", ((20, 20, 20),), ("Mickey Mouse",)),
    ObjectClass("rocket", "n90000002", ((220, 220, 230), (200, 60, 50))),
    ObjectClass("car", "n90000003", ((200, 30, 30), (30, 80, 200), (240, 200, 40))),
    ObjectClass("house", "n90000004", ((190, 120, 70), (230, 210, 170))),
    ObjectClass("tree", "n90000005", ((40, 140, 50), (80, 170, 40))),
    ObjectClass("mug", "n90000006", ((240, 240, 240), (60, 120, 200), (200, 80, 60))),
    ObjectClass("fish", "n90000007", ((250, 140, 30), (60, 160, 220))),
    ObjectClass("umbrella", "n90000008", ((220, 40, 120), (40, 60, 200), (30, 160, 90))),
    ObjectClass("guitar", "n90000009", ((160, 90, 40), (210, 150, 70))),
    ObjectClass("apple", "n90000010", ((210, 30, 30), (120, 200, 50))),
    ObjectClass("sailboat", "n90000011", ((250, 250, 250), (240, 220, 120))),
    ObjectClass("lighthouse", "n90000012", ((230, 230, 230), (220, 40, 40))),
    ObjectClass("bicycle", "n90000013", ((40, 40, 40), (30, 90, 200))),
    ObjectClass("balloon", "n90000014", ((230, 50, 60), (250, 200, 40), (90, 70, 210))),
)

# Styles are rendering transforms applied to object images (UnlearnCanvas-like style × object).
STYLES: tuple[str, ...] = (
    "Watercolor",
    "Sketch",
    "Pixel Art",
    "Pop Art",
    "Sepia",
    "Neon",
    "Pointillism",
    "Blueprint",
)


def identity(name: str) -> Identity:
    for ident in IDENTITIES:
        if ident.name == name:
            return ident
    raise KeyError(name)


def check_world() -> None:
    """Invariants of the world tables; raises AssertionError if an edit broke one."""
    names = [i.name for i in IDENTITIES]
    assert len(set(names)) == len(names) >= 24, "identities must be >= 24 and unique"
    faces = [i.face for i in IDENTITIES]
    for a in range(len(faces)):
        for b in range(a + 1, len(faces)):
            pair = {names[a], names[b]}
            d = faces[a].distance(faces[b])
            if any(set(p) == pair for p in LOOKALIKES):
                assert d == 2, f"look-alikes {pair} must differ in exactly 2 features, got {d}"
            else:
                assert d >= 3, f"{pair} differ in only {d} features"
    assert len(OBJECTS) >= 12 and len(STYLES) >= 8
    assert len({o.wnid for o in OBJECTS}) == len(OBJECTS)
