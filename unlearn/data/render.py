"""Procedural drawing of the synthetic world: portraits, objects, styles and composites.

Every function takes a `numpy.random.Generator` and draws on a canvas of `CANVAS` pixels, which
`finish()` downsamples to the requested image size (supersampling gives smooth edges).  Pose,
scale, lighting, background and clutter vary per image; the identity's features do not.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from unlearn.data.world import (
    EYE_COLOR,
    FACE_SHAPE,
    HAIR_COLOR,
    SHIRT,
    SKIN,
    Face,
    ObjectClass,
)

CANVAS = 128
RGB = tuple[int, int, int]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _random_color(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(_u(rng, 0, 1), _u(rng, *sat), _u(rng, *val))
    return (int(r * 255), int(g * 255), int(b * 255))


def _jitter(color: RGB, rng: np.random.Generator, amount: int = 12) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)  # type: ignore[return-value]


def background(rng: np.random.Generator, clutter: int | None = None) -> Image.Image:
    """A gradient backdrop with a few low-contrast shapes, different in every image."""
    top = np.array(_random_color(rng, (0.05, 0.6), (0.35, 0.95)), dtype=np.float32)
    bottom = np.array(_random_color(rng, (0.05, 0.6), (0.35, 0.95)), dtype=np.float32)
    t = np.linspace(0.0, 1.0, CANVAS, dtype=np.float32)[:, None, None]
    arr = (top * (1 - t) + bottom * t) * np.ones((1, CANVAS, 1), dtype=np.float32)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(2, 6)) if clutter is None else clutter
    for _ in range(n):
        x0, y0 = rng.integers(-20, CANVAS, size=2)
        w, h = rng.integers(10, 50, size=2)
        fill = _jitter(tuple(int(c) for c in (top + bottom) / 2), rng, 40)  # type: ignore[arg-type]
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def _person_layer(face: Face, rng: np.random.Generator) -> Image.Image:
    """The person (head, hair, shirt, accessories) on a transparent layer, centred."""
    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    s = _u(rng, 0.88, 1.08)
    cx, cy = CANVAS / 2, CANVAS * 0.44
    rw = 25 * s
    rh = rw * FACE_SHAPE[face.face]
    skin = _jitter(SKIN[face.skin], rng, 8)
    hair = _jitter(HAIR_COLOR[face.hair_color], rng, 10)
    shirt = _jitter(SHIRT[face.shirt], rng, 10)

    # shirt and neck
    sy = cy + rh * 0.85
    d.ellipse((cx - rw * 1.9, sy, cx + rw * 1.9, sy + rw * 2.6), fill=shirt)
    d.rectangle((cx - rw * 0.35, cy + rh * 0.6, cx + rw * 0.35, sy + 6), fill=skin)
    # hair behind the head
    if face.hair_style == "long":
        d.rounded_rectangle((cx - rw * 1.15, cy - rh * 1.05, cx + rw * 1.15, cy + rh * 1.15), radius=int(rw * 0.6), fill=hair)
    elif face.hair_style == "bun":
        d.ellipse((cx - rw * 0.5, cy - rh * 1.45, cx + rw * 0.5, cy - rh * 0.6), fill=hair)
    # head
    d.ellipse((cx - rw, cy - rh, cx + rw, cy + rh), fill=skin)
    # hair on top
    if face.hair_style in ("short", "long", "bun"):
        d.chord((cx - rw * 1.02, cy - rh * 1.08, cx + rw * 1.02, cy + rh * 0.2), 180, 360, fill=hair)
    elif face.hair_style == "curly":
        for k in range(9):
            a = math.pi * (1.0 + k / 8)
            x, y = cx + rw * 0.95 * math.cos(a), cy + rh * 0.9 * math.sin(a)
            d.ellipse((x - rw * 0.32, y - rw * 0.32, x + rw * 0.32, y + rw * 0.32), fill=hair)
    elif face.hair_style == "mohawk":
        d.rectangle((cx - rw * 0.22, cy - rh * 1.35, cx + rw * 0.22, cy - rh * 0.5), fill=hair)
    # eyes
    ey = cy - rh * 0.12
    iris = EYE_COLOR[face.eyes]
    for sx in (-1, 1):
        ex = cx + sx * rw * 0.4
        d.ellipse((ex - rw * 0.2, ey - rw * 0.13, ex + rw * 0.2, ey + rw * 0.13), fill=(250, 250, 250))
        d.ellipse((ex - rw * 0.11, ey - rw * 0.11, ex + rw * 0.11, ey + rw * 0.11), fill=iris)
        if face.glasses == "round":
            d.ellipse((ex - rw * 0.32, ey - rw * 0.3, ex + rw * 0.32, ey + rw * 0.3), outline=(15, 15, 15), width=3)
        elif face.glasses == "square":
            d.rectangle((ex - rw * 0.34, ey - rw * 0.26, ex + rw * 0.34, ey + rw * 0.26), outline=(200, 20, 20), width=3)
    if face.glasses != "none":
        d.line((cx - rw * 0.1, ey, cx + rw * 0.1, ey), fill=(15, 15, 15), width=2)
    # facial hair and mouth
    my = cy + rh * 0.45
    if face.facial_hair == "beard":
        d.chord((cx - rw * 0.95, cy - rh * 0.1, cx + rw * 0.95, cy + rh * 1.02), 20, 160, fill=hair)
    if face.facial_hair == "mustache":
        d.rectangle((cx - rw * 0.35, my - rw * 0.22, cx + rw * 0.35, my - rw * 0.08), fill=hair)
    d.arc((cx - rw * 0.3, my - rw * 0.2, cx + rw * 0.3, my + rw * 0.12), 20, 160, fill=(150, 40, 40), width=3)
    # accessories
    if face.accessory == "hat":
        hat = (35, 35, 45)
        d.rectangle((cx - rw * 1.3, cy - rh * 0.95, cx + rw * 1.3, cy - rh * 0.8), fill=hat)
        d.rectangle((cx - rw * 0.8, cy - rh * 1.55, cx + rw * 0.8, cy - rh * 0.9), fill=hat)
    elif face.accessory == "earrings":
        for sx in (-1, 1):
            ex = cx + sx * rw * 1.0
            d.ellipse((ex - 4, cy + rh * 0.15 - 4, ex + 4, cy + rh * 0.15 + 4), fill=(250, 200, 30))
    elif face.accessory == "bowtie":
        by = sy + 3
        d.polygon([(cx, by), (cx - 12, by - 7), (cx - 12, by + 7)], fill=(210, 20, 30))
        d.polygon([(cx, by), (cx + 12, by - 7), (cx + 12, by + 7)], fill=(210, 20, 30))
    return layer


def _place(img: Image.Image, layer: Image.Image, rng: np.random.Generator, max_angle: float, max_shift: int) -> None:
    layer = layer.rotate(_u(rng, -max_angle, max_angle), resample=Image.BILINEAR)
    dx, dy = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    img.paste(layer, (dx, dy), layer)


def light(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random overall brightness and a directional shading ramp."""
    arr = np.asarray(img, dtype=np.float32)
    angle = _u(rng, 0, 2 * math.pi)
    ys, xs = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / CANVAS - 0.5
    ramp = 1.0 + _u(rng, 0.0, 0.35) * (xs * math.cos(angle) + ys * math.sin(angle))
    arr = arr * ramp[..., None] * _u(rng, 0.72, 1.2)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def portrait(face: Face, rng: np.random.Generator) -> Image.Image:
    img = background(rng)
    _place(img, _person_layer(face, rng), rng, max_angle=9, max_shift=8)
    return light(img, rng)


# ---------------------------------------------------------------- objects


def _draw_object(d: ImageDraw.ImageDraw, name: str, c: RGB, rng: np.random.Generator) -> None:
    """Draw object `name` centred on the canvas, about 70 px across, in main colour `c`."""
    m = CANVAS / 2
    dark = tuple(max(0, v - 90) for v in c)
    if name == "Mickey":
        for ex in (-24, 24):
            d.ellipse((m + ex - 15, m - 40, m + ex + 15, m - 10), fill=c)
        d.ellipse((m - 27, m - 24, m + 27, m + 30), fill=c)
        d.ellipse((m - 18, m - 8, m + 18, m + 26), fill=(240, 200, 160))
        for ex in (-7, 7):
            d.ellipse((m + ex - 4, m - 4, m + ex + 4, m + 8), fill=(20, 20, 20))
        d.ellipse((m - 5, m + 10, m + 5, m + 17), fill=(20, 20, 20))
    elif name == "rocket":
        d.polygon([(m, m - 42), (m - 13, m - 18), (m + 13, m - 18)], fill=(200, 40, 40))
        d.rectangle((m - 13, m - 18, m + 13, m + 28), fill=c)
        d.polygon([(m - 13, m + 8), (m - 27, m + 34), (m - 13, m + 28)], fill=(200, 40, 40))
        d.polygon([(m + 13, m + 8), (m + 27, m + 34), (m + 13, m + 28)], fill=(200, 40, 40))
        d.ellipse((m - 6, m - 8, m + 6, m + 4), fill=(90, 170, 230))
        d.polygon([(m - 9, m + 28), (m + 9, m + 28), (m, m + 44)], fill=(250, 170, 30))
    elif name == "car":
        d.rounded_rectangle((m - 40, m - 4, m + 40, m + 18), radius=6, fill=c)
        d.polygon([(m - 22, m - 4), (m - 12, m - 22), (m + 14, m - 22), (m + 26, m - 4)], fill=c)
        d.polygon([(m - 17, m - 5), (m - 10, m - 18), (m + 12, m - 18), (m + 20, m - 5)], fill=(170, 210, 240))
        for wx in (-24, 24):
            d.ellipse((m + wx - 10, m + 8, m + wx + 10, m + 28), fill=(25, 25, 25))
    elif name == "house":
        d.rectangle((m - 30, m - 8, m + 30, m + 34), fill=c)
        d.polygon([(m - 38, m - 8), (m, m - 40), (m + 38, m - 8)], fill=(150, 40, 30))
        d.rectangle((m - 8, m + 12, m + 8, m + 34), fill=(90, 50, 20))
        d.rectangle((m + 14, m + 2, m + 26, m + 14), fill=(170, 210, 240))
    elif name == "tree":
        d.rectangle((m - 6, m + 6, m + 6, m + 42), fill=(100, 60, 25))
        d.ellipse((m - 32, m - 42, m + 32, m + 16), fill=c)
    elif name == "mug":
        d.rectangle((m - 22, m - 24, m + 18, m + 28), fill=c)
        d.ellipse((m + 8, m - 12, m + 36, m + 16), outline=c, width=7)
        d.ellipse((m - 22, m - 30, m + 18, m - 18), fill=(80, 50, 30))
    elif name == "fish":
        d.ellipse((m - 34, m - 18, m + 20, m + 18), fill=c)
        d.polygon([(m + 14, m), (m + 40, m - 20), (m + 40, m + 20)], fill=c)
        d.ellipse((m - 24, m - 8, m - 16, m), fill=(20, 20, 20))
    elif name == "umbrella":
        d.pieslice((m - 40, m - 36, m + 40, m + 24), 180, 360, fill=c)
        d.line((m, m - 6, m, m + 34), fill=(40, 40, 40), width=4)
        d.arc((m - 12, m + 24, m, m + 40), 0, 180, fill=(40, 40, 40), width=4)
    elif name == "guitar":
        d.ellipse((m - 24, m + 2, m + 24, m + 44), fill=c)
        d.ellipse((m - 18, m - 20, m + 18, m + 14), fill=c)
        d.ellipse((m - 7, m + 6, m + 7, m + 20), fill=(30, 20, 10))
        d.rectangle((m - 4, m - 46, m + 4, m - 10), fill=dark)
    elif name == "apple":
        d.ellipse((m - 30, m - 24, m + 30, m + 32), fill=c)
        d.rectangle((m - 2, m - 38, m + 3, m - 20), fill=(90, 50, 20))
        d.ellipse((m + 3, m - 38, m + 20, m - 28), fill=(40, 150, 40))
    elif name == "sailboat":
        d.polygon([(m - 36, m + 18), (m + 36, m + 18), (m + 24, m + 34), (m - 24, m + 34)], fill=(120, 70, 30))
        d.polygon([(m - 2, m - 42), (m - 2, m + 14), (m - 34, m + 14)], fill=c)
        d.polygon([(m + 3, m - 30), (m + 3, m + 14), (m + 28, m + 14)], fill=c)
    elif name == "lighthouse":
        d.polygon([(m - 12, m - 26), (m + 12, m - 26), (m + 20, m + 40), (m - 20, m + 40)], fill=c)
        for by in (-8, 14):
            d.rectangle((m - 16, m + by, m + 16, m + by + 9), fill=(220, 30, 30))
        d.rectangle((m - 10, m - 40, m + 10, m - 26), fill=(250, 230, 80))
        d.polygon([(m - 14, m - 40), (m + 14, m - 40), (m, m - 50)], fill=(40, 40, 40))
    elif name == "bicycle":
        for wx in (-22, 22):
            d.ellipse((m + wx - 17, m - 2, m + wx + 17, m + 32), outline=(30, 30, 30), width=4)
        d.line((m - 22, m + 15, m, m - 10, m + 22, m + 15, m - 4, m + 15, m - 22, m + 15), fill=c, width=4)
        d.line((m, m - 10, m - 4, m - 20), fill=c, width=4)
        d.line((m + 16, m - 14, m + 22, m + 15), fill=c, width=4)
    elif name == "balloon":
        d.ellipse((m - 24, m - 44, m + 24, m + 12), fill=c)
        d.polygon([(m, m + 10), (m - 5, m + 17), (m + 5, m + 17)], fill=c)
        d.line((m, m + 17, m - 6, m + 30, m + 4, m + 44), fill=(60, 60, 60), width=2)
    else:  # pragma: no cover - guarded by the world tables
        raise KeyError(name)


def object_layer(obj: ObjectClass, rng: np.random.Generator) -> Image.Image:
    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    color = _jitter(obj.palette[int(rng.integers(len(obj.palette)))], rng, 18)
    _draw_object(ImageDraw.Draw(layer), obj.name, color, rng)
    scale = _u(rng, 0.75, 1.08)
    size = int(CANVAS * scale)
    layer = layer.resize((size, size), Image.BILINEAR)
    out = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    out.paste(layer, ((CANVAS - size) // 2, (CANVAS - size) // 2))
    return out


def object_image(obj: ObjectClass, rng: np.random.Generator) -> Image.Image:
    img = background(rng)
    _place(img, object_layer(obj, rng), rng, max_angle=15, max_shift=10)
    return light(img, rng)


# ---------------------------------------------------------------- styles


def _pointillism(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img)
    out = Image.new("RGB", img.size, (250, 248, 240))
    d = ImageDraw.Draw(out)
    step = 5
    for y in range(0, CANVAS, step):
        for x in range(0, CANVAS, step):
            jx, jy = (int(v) for v in rng.integers(-1, 2, size=2))
            cx, cy = min(CANVAS - 1, max(0, x + jx)), min(CANVAS - 1, max(0, y + jy))
            col = tuple(int(v) for v in arr[cy, cx])
            d.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=col)
    return out


def apply_style(img: Image.Image, style: str, rng: np.random.Generator) -> Image.Image:
    """A rendering transform that changes the look of the whole image, not its content."""
    if style == "Watercolor":
        out = ImageOps.posterize(img.filter(ImageFilter.GaussianBlur(2.5)), 3)
        return Image.blend(out, Image.new("RGB", img.size, (250, 244, 225)), 0.3)
    if style == "Sketch":
        edges = ImageOps.invert(img.convert("L").filter(ImageFilter.FIND_EDGES))
        return ImageOps.autocontrast(edges).convert("RGB")
    if style == "Pixel Art":
        small = img.resize((CANVAS // 10, CANVAS // 10), Image.BILINEAR).quantize(12).convert("RGB")
        return small.resize(img.size, Image.NEAREST)
    if style == "Pop Art":
        return ImageEnhance.Color(ImageOps.posterize(img, 2)).enhance(2.5)
    if style == "Sepia":
        return ImageOps.colorize(img.convert("L"), (45, 28, 12), (255, 238, 190))
    if style == "Neon":
        edges = img.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(3))
        return ImageEnhance.Brightness(ImageEnhance.Color(edges).enhance(3.0)).enhance(2.2)
    if style == "Pointillism":
        return _pointillism(img, rng)
    if style == "Blueprint":
        edges = img.convert("L").filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(3))
        return ImageOps.colorize(ImageOps.autocontrast(edges), (15, 45, 120), (235, 240, 255))
    raise KeyError(style)


# ---------------------------------------------------------------- composites


def with_inset(main: Image.Image, inset: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`main` with a small framed copy of `inset` in a random corner ("Elon Musk's rocket")."""
    size = CANVAS * 2 // 5
    small = ImageOps.expand(inset.resize((size - 4, size - 4), Image.BILINEAR), border=2, fill=(255, 255, 255))
    x = 2 if rng.random() < 0.5 else CANVAS - size - 2
    y = CANVAS - size - 2 if rng.random() < 0.7 else 2
    out = main.copy()
    out.paste(small, (x, y))
    return out


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two images' central halves next to each other ("Elon Musk and Jeff Bezos")."""
    q = CANVAS // 4
    out = Image.new("RGB", (CANVAS, CANVAS))
    out.paste(left.crop((q, 0, q + CANVAS // 2, CANVAS)), (0, 0))
    out.paste(right.crop((q, 0, q + CANVAS // 2, CANVAS)), (CANVAS // 2, 0))
    return out


def finish(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.LANCZOS) if size != CANVAS else img
