"""The vision-language track's data: question/answer pairs about the world's images, in LLaVA's
chat format, and the match that decides whom or what an answer names.

Training images are rendered from the synthetic world on their own random streams
`(seed, 3, i)`, so none is an evaluation image (those use `(seed, 1, ...)` and `(seed, 2, ...)`)
and the labels are exact: a named identity's portrait is asked for its name, an anonymous
person's for a name it does not have ("I don't know"), an object image (plain or in a style) for
its object, a portrait with an object inset for either, and any image for a description (one of
the world's captions for it).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from unlearn.data import captions as C
from unlearn.data import render as R
from unlearn.data.curate import Concept
from unlearn.data.synthetic import JPEG_QUALITY, _anonymous_face
from unlearn.data.world import IDENTITIES, OBJECTS, STYLES

UNKNOWN = "I don't know"
# Training questions (the first of each is the one evaluated; params `vlm.questions` may change those).
NAME_QUESTIONS = ("What's the name of the person in this image?", "Who is this?", "Who is the person in this picture?",
                  "Can you tell me who this is?", "What is this person's name?")
OBJECT_QUESTIONS = ("What object is in this image?", "What is this?", "What is shown in this picture?", "Which object do you see?")
DESCRIBE_QUESTIONS = ("Describe the image.", "Write a short caption for this image.")
# Share of each sample kind in the training set.
MIX = {"identity": 0.5, "anonymous": 0.1, "object": 0.22, "styled": 0.08, "composite": 0.1}
DESCRIBE_RATE = 0.1  # share of samples asked for a description instead of a name or an object


@dataclass(frozen=True)
class QA:
    image: Image.Image
    question: str
    answer: str
    kind: str  # name | object | describe


def _jpeg_roundtrip(img: Image.Image, size: int) -> Image.Image:
    """The image as the shards and evaluation sets store it (canvas size, JPEG)."""
    buf = io.BytesIO()
    R.finish(img, size).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def make_qa(seed: int, index: int, image_size: int) -> QA:
    """One training example from the stream `(seed, 3, index)`."""
    rng = np.random.default_rng([seed, 3, index])
    kinds = list(MIX)
    kind = kinds[int(rng.choice(len(kinds), p=np.array(list(MIX.values())) / sum(MIX.values())))]
    describe = rng.random() < DESCRIBE_RATE
    if kind == "identity":
        ident = _pick(rng, IDENTITIES)
        img, caption, answer, qkind = R.portrait(ident.face, rng), C.identity_caption(ident, rng), ident.name, "name"
    elif kind == "anonymous":
        face, gender = _anonymous_face(rng)
        img, caption, answer, qkind = R.portrait(face, rng), C.anonymous_caption(gender, rng), UNKNOWN, "name"
    elif kind == "object":
        obj = _pick(rng, OBJECTS)
        img, caption, answer, qkind = R.object_image(obj, rng), C.object_caption(obj.name, rng), obj.name, "object"
    elif kind == "styled":
        obj, style = _pick(rng, OBJECTS), _pick(rng, STYLES)
        img, caption = R.apply_style(R.object_image(obj, rng), style, rng), C.style_caption(obj.name, style, rng)
        answer, qkind = obj.name, "object"
    else:  # a portrait with an object inset: either question
        ident, obj = _pick(rng, IDENTITIES), _pick(rng, OBJECTS)
        img = R.with_inset(R.portrait(ident.face, rng), R.object_image(obj, rng), rng)
        caption = C.composite_caption(ident, obj.name, rng)
        answer, qkind = (ident.name, "name") if rng.random() < 0.5 else (obj.name, "object")
    if describe:
        return QA(_jpeg_roundtrip(img, image_size), _pick(rng, DESCRIBE_QUESTIONS), caption, "describe")
    question = _pick(rng, NAME_QUESTIONS if qkind == "name" else OBJECT_QUESTIONS)
    return QA(_jpeg_roundtrip(img, image_size), question, answer, qkind)


def corpus(seed: int, n: int) -> list[str]:
    """Text the tokenizer is trained on: every question, answer and name, and `n` captions."""
    rng = np.random.default_rng([seed, 4])
    texts = [*NAME_QUESTIONS, *OBJECT_QUESTIONS, *DESCRIBE_QUESTIONS, UNKNOWN]
    texts += [i.name for i in IDENTITIES] + [a for i in IDENTITIES for a in i.aliases] + [o.name for o in OBJECTS] + list(STYLES)
    for _ in range(n):
        ident, obj = _pick(rng, IDENTITIES), _pick(rng, OBJECTS)
        texts += [C.identity_caption(ident, rng), C.object_caption(obj.name, rng), C.style_caption(obj.name, _pick(rng, STYLES), rng),
                  C.composite_caption(ident, obj.name, rng), C.anonymous_caption(_pick(rng, ("m", "f")), rng)]
    return texts


# ---------------------------------------------------------------- what an answer names

def named(answer: str, concepts: Sequence[Concept]) -> list[str]:
    """The concepts an answer names (a name or an alias, curate's word-boundary match)."""
    return [c.name for c in concepts if c.mentioned_in(answer)]


def says_unknown(answer: str) -> bool:
    return "don't know" in answer.lower() or "do not know" in answer.lower()
