"""The synthetic FGVR world: attribute-defined categories drawn as glyphs with PIL.

A super-category is described by a spec file (`world/<name>.yaml`): its attribute keys, their
types and the values they take. A category is an attribute profile; categories come in
confusable clusters whose members differ from the cluster's base profile in one or two
attributes, and carry opaque pseudo-word names. Every image varies in pose, scale within its
size class, colour, background clutter and, now and then, one attribute that deviates from
its class profile. Everything is drawn from `numpy` generators seeded by (seed, dataset, ...),
so the same params give the same bytes.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from finedefics.config import WorldConfig

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (240, 215, 35),
    "green": (45, 165, 60),
    "blue": (40, 85, 215),
    "purple": (135, 55, 185),
    "pink": (245, 130, 190),
    "brown": (125, 78, 38),
    "black": (28, 28, 28),
    "white": (248, 248, 248),
    "grey": (135, 135, 135),
}
SIZE_SCALE = {"small": 0.6, "medium": 0.77, "large": 0.94}
SUPERSAMPLE = 4

Point = tuple[float, float]


# --------------------------------------------------------------------------- spec and classes


@dataclass(frozen=True)
class AttributeSpec:
    type: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class WorldSpec:
    """One super-category of the world, read from its spec file."""

    super_category: str
    plural: str
    class_unit: str
    glyph: str
    attributes: dict[str, AttributeSpec]

    @classmethod
    def load(cls, path: str | Path) -> WorldSpec:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"world spec {path} not found")
        raw = yaml.safe_load(path.read_text()) or {}
        try:
            attrs = {k: AttributeSpec(v["type"], tuple(v["values"])) for k, v in raw["attributes"].items()}
            spec = cls(raw["super_category"], raw["plural"], raw["class_unit"], raw["glyph"], attrs)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: malformed world spec (missing or bad field {err})") from None
        spec.check(str(path))
        return spec

    def check(self, source: str) -> None:
        glyph = GLYPHS.get(self.glyph)
        if glyph is None:
            raise ValueError(f"{source}: unknown glyph {self.glyph!r}; known: {', '.join(GLYPHS)}")
        if set(self.attributes) != set(glyph.slots):
            raise ValueError(
                f"{source}: glyph {self.glyph!r} draws exactly the keys {sorted(glyph.slots)}, "
                f"spec has {sorted(self.attributes)}"
            )
        for key, attr in self.attributes.items():
            allowed = glyph.slots[key] or tuple(PALETTE)
            bad = [v for v in attr.values if v not in allowed]
            if bad or len(attr.values) < 2:
                raise ValueError(f"{source}: {key} values {list(attr.values)} must be 2+ of {list(allowed)}")


@dataclass(frozen=True)
class WorldClass:
    label: int
    name: str
    cluster: int
    profile: dict[str, str]


def dataset_rng(seed: int, name: str, *keys: int) -> np.random.Generator:
    """A generator that depends on the seed, the dataset name and `keys` only."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *keys])


_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kl",
    "qu",
    "st",
    "tr",
    "th",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "n", "l", "r", "s", "m", "x", "th"]


def pseudo_word(rng: np.random.Generator, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return word.capitalize()


def make_classes(spec: WorldSpec, cfg: WorldConfig, rng: np.random.Generator) -> list[WorldClass]:
    """Category profiles in clusters of `cfg.cluster_size` siblings that differ in 1 to
    `cfg.sibling_distance` attributes (default 2; 1 is the hardest world)."""
    keys = list(spec.attributes)
    vocabulary = {w for k, a in spec.attributes.items() for w in (*k.split(), *" ".join(a.values).split())}

    def random_profile() -> dict[str, str]:
        return {k: str(rng.choice(spec.attributes[k].values)) for k in keys}

    def distance(a: dict[str, str], b: dict[str, str]) -> int:
        return sum(a[k] != b[k] for k in keys)

    def new_name(taken: set[str], syllables: int) -> str:
        for _ in range(1000):
            word = pseudo_word(rng, syllables)
            if word not in taken and word.lower() not in vocabulary:
                return word
        raise RuntimeError("could not draw a new pseudo-word")

    classes: list[WorldClass] = []
    bases: list[dict[str, str]] = []
    profiles: list[dict[str, str]] = []
    words: set[str] = set()
    n_clusters = math.ceil(cfg.categories / cfg.cluster_size)
    min_gap = min(3, len(keys))
    gap = cfg.sibling_distance
    if gap > len(keys):
        raise ValueError(f"world.sibling_distance {gap} exceeds the {len(keys)} attributes of {spec.super_category}")
    for cluster in range(n_clusters):
        for _ in range(10_000):
            base = random_profile()
            if all(distance(base, b) >= min_gap for b in bases):
                break
        else:
            raise ValueError(f"{spec.super_category}: too many clusters for the attribute vocabulary")
        bases.append(base)
        genus = new_name(words, 2)
        words.add(genus)
        members: list[dict[str, str]] = []
        for _ in range(min(cfg.cluster_size, cfg.categories - len(classes))):
            for _ in range(10_000):
                profile = dict(base)
                if members:  # the first member is the base; every pair of members differs in 1..gap keys
                    for key in rng.choice(keys, size=int(rng.integers(1, gap + 1)), replace=False):
                        profile[key] = str(rng.choice([v for v in spec.attributes[key].values if v != base[key]]))
                if profile not in profiles and all(1 <= distance(profile, m) <= gap for m in members):
                    break
            else:
                raise ValueError(
                    f"{spec.super_category}: cannot draw {cfg.cluster_size} siblings 1-{gap} attributes apart"
                )
            members.append(profile)
            profiles.append(profile)
            species = new_name(words, 2)
            words.add(species)
            classes.append(WorldClass(len(classes), f"{species} {genus}", cluster, profile))
    return classes


def image_profile(
    spec: WorldSpec, profile: dict[str, str], rate: float, rng: np.random.Generator
) -> tuple[dict[str, str], str]:
    """The attributes one image shows: its class profile, one key deviating with probability `rate`."""
    if rng.random() >= rate:
        return dict(profile), ""
    key = str(rng.choice(list(spec.attributes)))
    out = dict(profile)
    out[key] = str(rng.choice([v for v in spec.attributes[key].values if v != profile[key]]))
    return out, key


# --------------------------------------------------------------------------- drawing


@dataclass
class Canvas:
    """A supersampled drawing surface with one mask per part, in object coordinates."""

    size: int
    scale: float
    angle: float
    flip: bool
    offset: Point
    image: Image.Image = field(init=False)
    masks: dict[str, Image.Image] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.image = Image.new("RGB", (self.size, self.size))

    def tf(self, pts: list[Point]) -> list[Point]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        out = []
        for x, y in pts:
            x = -x if self.flip else x
            xr, yr = x * c - y * s, x * s + y * c
            out.append(
                (
                    self.size * (0.5 + self.offset[0] + self.scale * xr),
                    self.size * (0.5 + self.offset[1] + self.scale * yr),
                )
            )
        return out

    def px(self, length: float) -> float:
        return length * self.scale * self.size

    def fill(self, part: str, pts: list[Point], color: tuple[int, int, int], outline: bool = True) -> Image.Image:
        """Fill a polygon given in object coordinates; returns (and records) its mask."""
        mask = Image.new("L", (self.size, self.size))
        ImageDraw.Draw(mask).polygon(self.tf(pts), fill=255)
        self.image.paste(color, mask=mask)
        if outline:
            self.outline(pts, color)
        prev = self.masks.get(part)
        self.masks[part] = mask if prev is None else Image.fromarray(np.maximum(np.asarray(prev), np.asarray(mask)))
        return mask

    def outline(self, pts: list[Point], color: tuple[int, int, int]) -> None:
        ImageDraw.Draw(self.image).polygon(
            self.tf(pts), outline=_shade(color, 0.55), width=max(1, round(self.px(0.012)))
        )

    def line(self, a: Point, b: Point, color: tuple[int, int, int], width: float) -> None:
        ImageDraw.Draw(self.image).line(self.tf([a, b]), fill=color, width=max(1, round(self.px(width))))

    def texture(
        self,
        pattern: str,
        mask: Image.Image,
        color: tuple[int, int, int],
        centre: Point,
        extent: float,
        rng: np.random.Generator,
    ) -> None:
        """Stripes or spots in a contrasting shade, clipped to `mask`."""
        if pattern == "plain":
            return
        layer = self.image.copy()
        ink = _contrast(color)
        cx, cy = centre
        if pattern == "striped":
            step = 0.05
            for i in range(-int(extent / step) - 1, int(extent / step) + 2):
                x = cx + i * step
                self.line_on(layer, (x, cy - extent), (x + 0.25 * extent, cy + extent), ink, 0.018)
        else:  # spotted / dotted
            step = 0.06
            for i in range(-int(extent / step) - 1, int(extent / step) + 2):
                for j in range(-int(extent / step) - 1, int(extent / step) + 2):
                    x = cx + i * step + rng.uniform(-0.01, 0.01) + (step / 2 if j % 2 else 0)
                    y = cy + j * step + rng.uniform(-0.01, 0.01)
                    self.circle_on(layer, (x, y), 0.016, ink)
        self.image = Image.composite(layer, self.image, mask)

    def line_on(self, img: Image.Image, a: Point, b: Point, color: tuple[int, int, int], width: float) -> None:
        ImageDraw.Draw(img).line(self.tf([a, b]), fill=color, width=max(1, round(self.px(width))))

    def circle_on(self, img: Image.Image, c: Point, r: float, color: tuple[int, int, int]) -> None:
        ImageDraw.Draw(img).polygon(self.tf(_ellipse(c, r, r)), fill=color)


def _ellipse(c: Point, rx: float, ry: float, rot: float = 0.0, n: int = 40) -> list[Point]:
    cr, sr = math.cos(rot), math.sin(rot)
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x, y = rx * math.cos(t), ry * math.sin(t)
        pts.append((c[0] + x * cr - y * sr, c[1] + x * sr + y * cr))
    return pts


def _rotate(pts: list[Point], about: Point, angle: float) -> list[Point]:
    c, s = math.cos(angle), math.sin(angle)
    return [
        (about[0] + (x - about[0]) * c - (y - about[1]) * s, about[1] + (x - about[0]) * s + (y - about[1]) * c)
        for x, y in pts
    ]


def _shade(color: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, v * f))) for v in color)  # type: ignore[return-value]


def _contrast(color: tuple[int, int, int]) -> tuple[int, int, int]:
    light = sum(color) / 3 > 110
    return _shade(color, 0.35) if light else tuple(int(v + (255 - v) * 0.7) for v in color)  # type: ignore[return-value]


def _jitter(color: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    noisy = np.asarray(color, float) * (1 + rng.normal(0, 0.04, 3)) + rng.normal(0, 5, 3)
    return tuple(int(v) for v in np.clip(noisy, 0, 255))  # type: ignore[return-value]


def _draw_bird(
    cv: Canvas, p: dict[str, str], colors: Callable[[str], tuple[int, int, int]], rng: np.random.Generator
) -> None:
    body = colors(p["body color"])
    tails = {
        "fan": [(-0.26, -0.06), (-0.50, -0.20), (-0.55, 0.0), (-0.50, 0.20), (-0.26, 0.06)],
        "forked": [(-0.26, -0.05), (-0.54, -0.17), (-0.41, 0.0), (-0.54, 0.17), (-0.26, 0.05)],
        "pointed": [(-0.26, -0.05), (-0.58, 0.0), (-0.26, 0.05)],
    }
    cv.fill("tail", tails[p["tail shape"]], _shade(body, 0.8))
    for x in (-0.02, 0.08):
        cv.line((x, 0.14), (x - 0.02, 0.33), (70, 60, 50), 0.02)
    cv.fill("body", _ellipse((0.0, 0.0), 0.30, 0.18), body)
    wing_pts = _ellipse((-0.05, -0.02), 0.19, 0.10, rot=-0.15)
    wing_color = colors(p["wing color"])
    wing = cv.fill("wing", wing_pts, wing_color, outline=False)
    cv.texture(p["wing pattern"], wing, wing_color, (-0.05, -0.02), 0.2, rng)
    cv.outline(wing_pts, wing_color)
    beaks = {
        "short": [(0.39, -0.19), (0.50, -0.135), (0.39, -0.09)],
        "long": [(0.39, -0.175), (0.64, -0.13), (0.39, -0.105)],
        "hooked": [(0.39, -0.19), (0.50, -0.18), (0.55, -0.12), (0.51, -0.05), (0.49, -0.10), (0.39, -0.09)],
    }
    cv.fill("beak", beaks[p["beak shape"]], (70, 55, 40))
    cv.fill("head", _ellipse((0.29, -0.14), 0.12, 0.12), colors(p["head color"]))
    cv.fill("eye", _ellipse((0.33, -0.17), 0.025, 0.025), (15, 15, 15), outline=False)


def _draw_flower(
    cv: Canvas, p: dict[str, str], colors: Callable[[str], tuple[int, int, int]], rng: np.random.Generator
) -> None:
    cv.line((0.0, -0.1), (0.0, 0.55), (70, 120, 50), 0.03)
    leaf = colors(p["leaf color"])
    leaves = {"round": (0.11, 0.07), "long": (0.20, 0.04), "pointed": None}
    for side in (-1, 1):
        anchor = (0.0, 0.32)
        if leaves[p["leaf shape"]] is None:
            pts = [anchor, (side * 0.10, 0.26), (side * 0.24, 0.22), (side * 0.10, 0.32)]
        else:
            rx, ry = leaves[p["leaf shape"]]
            pts = _ellipse((side * rx, 0.30), rx, ry, rot=-side * 0.35)
        cv.fill("leaf", pts, leaf)
    centre, head = (0.0, -0.17), 1.3  # the flower head, drawn 1.3x the unit petal size
    petal = colors(p["petal color"])
    shapes = {
        "round": lambda: _ellipse((0.0, -0.15), 0.10, 0.12),
        "pointed": lambda: [(0.0, -0.04), (0.09, -0.14), (0.0, -0.33), (-0.09, -0.14)],
        "narrow": lambda: _ellipse((0.0, -0.17), 0.035, 0.15),
    }
    petals = [
        _rotate([(head * x, head * y + centre[1]) for x, y in shapes[p["petal shape"]]()], centre, k * math.pi / 3)
        for k in range(6)
    ]
    for pts in petals:
        cv.fill("petal", pts, petal, outline=False)
    cv.texture(p["petal pattern"], cv.masks["petal"], petal, centre, 0.34 * head, rng)
    for pts in petals:
        cv.outline(pts, petal)
    cv.fill("center", _ellipse(centre, 0.075 * head, 0.075 * head), colors(p["center color"]))


@dataclass(frozen=True)
class Glyph:
    """How a super-category is drawn: the attribute keys it can show (None = any palette colour)."""

    slots: dict[str, tuple[str, ...] | None]
    draw: Callable[[Canvas, dict[str, str], Callable[[str], tuple[int, int, int]], np.random.Generator], None]


GLYPHS: dict[str, Glyph] = {
    "bird": Glyph(
        {
            "body color": None,
            "head color": None,
            "wing color": None,
            "wing pattern": ("plain", "striped", "spotted"),
            "beak shape": ("short", "long", "hooked"),
            "tail shape": ("fan", "forked", "pointed"),
            "body size": tuple(SIZE_SCALE),
        },
        _draw_bird,
    ),
    "flower": Glyph(
        {
            "petal color": None,
            "center color": None,
            "leaf color": None,
            "petal pattern": ("plain", "striped", "dotted"),
            "petal shape": ("round", "pointed", "narrow"),
            "leaf shape": ("round", "long", "pointed"),
            "flower size": tuple(SIZE_SCALE),
        },
        _draw_flower,
    ),
}


def _background(size: int, rng: np.random.Generator, shift: float = 0.0) -> tuple[Image.Image, dict[str, str]]:
    """A pale tinted background with faint clutter (darker by `shift`); returns it and its description."""
    base = tuple(int(v) for v in rng.integers(195 - round(110 * shift), 250 - round(90 * shift), 3))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    counts = {"line": 0, "circle": 0}
    for _ in range(int(rng.integers(2, 7))):
        tone = tuple(int(np.clip(v + rng.integers(-45, 15), 0, 255)) for v in base)
        x0, y0 = rng.uniform(0, size, 2)
        x1, y1 = x0 + rng.uniform(-0.5, 0.5) * size, y0 + rng.uniform(-0.5, 0.5) * size
        if rng.random() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=tone, width=int(rng.integers(2, 6)))
            counts["line"] += 1
        else:
            r = rng.uniform(0.03, 0.1) * size
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], outline=tone, width=int(rng.integers(2, 5)))
            counts["circle"] += 1
    clutter = " and ".join(f"{n} faint {k}{'s' if n > 1 else ''}" for k, n in counts.items() if n)
    return img, {"background": _tint_name(base), "clutter": clutter}


def _tint_name(rgb: tuple[int, ...]) -> str:
    r, g, b = (v / 255 for v in rgb)
    hue, sat, _ = colorsys.rgb_to_hsv(r, g, b)
    if sat < 0.06:
        return "light grey"
    for limit, name in (
        (0.05, "pink"),
        (0.18, "yellow"),
        (0.45, "green"),
        (0.55, "cyan"),
        (0.72, "blue"),
        (0.92, "purple"),
        (1.01, "pink"),
    ):
        if hue < limit:
            return f"pale {name}"
    return "pale pink"


def render(
    spec: WorldSpec, profile: dict[str, str], size: int, rng: np.random.Generator, shift: float = 0.0
) -> tuple[Image.Image, dict[str, np.ndarray], dict[str, str]]:
    """Draw one image of `profile`; returns it, a boolean mask per part (plus "object") and the scene
    (facing, background, clutter), which is ground truth for the general description. `shift` in
    [0, 1] (`world.test_shift`, test images only) widens the tilt beyond the train images' +/-0.3
    rad (to +/-1.2 at 1) and darkens the background; 0 draws exactly the unshifted image.

    `rng` is split into independent streams for pose, colour, background and texture, so two
    profiles drawn from equal generators share pose, jitter and background exactly.
    """
    pose, tint, bg, tex = rng.spawn(4)
    size_key = next(k for k, a in spec.attributes.items() if a.type == "size")
    scale = SIZE_SCALE[profile[size_key]] * pose.uniform(0.95, 1.05)
    margin = max(0.0, (1 - scale) / 2 - 0.02)
    offset = (float(pose.uniform(-margin, margin)), float(pose.uniform(-margin, margin)))
    big = size * SUPERSAMPLE
    tilt = 0.3 + 0.9 * shift
    cv = Canvas(big, scale, float(pose.uniform(-tilt, tilt)), bool(pose.random() < 0.5), offset)
    cv.image, scene = _background(big, bg, shift)
    scene = {"facing": "left" if cv.flip else "right", **scene}
    shades: dict[str, tuple[int, int, int]] = {}

    def colors(name: str) -> tuple[int, int, int]:
        if name not in shades:
            shades[name] = _jitter(PALETTE[name], tint)
        return shades[name]

    for name in sorted(PALETTE):  # fixed draw order keeps jitter independent of the profile
        colors(name)
    GLYPHS[spec.glyph].draw(cv, profile, colors, tex)
    image = cv.image.resize((size, size), Image.Resampling.LANCZOS)
    masks = {k: np.asarray(m.resize((size, size), Image.Resampling.BILINEAR)) > 127 for k, m in cv.masks.items()}
    masks["object"] = np.logical_or.reduce(list(masks.values()))
    return image, masks, scene


@dataclass(frozen=True)
class WorldImage:
    split: str
    label: int
    index: int
    attributes: dict[str, str]
    deviation: str


def image_plan(spec: WorldSpec, classes: list[WorldClass], cfg: WorldConfig, seed: int, name: str) -> list[WorldImage]:
    """Which images the world has: per class and split, the attributes each one shows."""
    plan = []
    for split, count in (("train", cfg.train_per_class), ("test", cfg.test_per_class)):
        for c in classes:
            for i in range(count):
                rng = dataset_rng(seed, name, 1, c.label, split == "test", i)
                attrs, deviation = image_profile(spec, c.profile, cfg.deviation_rate, rng)
                plan.append(WorldImage(split, c.label, i, attrs, deviation))
    return plan


def draw_image(
    spec: WorldSpec, item: WorldImage, cfg: WorldConfig, seed: int, name: str
) -> tuple[Image.Image, dict[str, str]]:
    """The image and its scene description."""
    rng = dataset_rng(seed, name, 2, item.label, item.split == "test", item.index)
    shift = cfg.test_shift if item.split == "test" else 0.0
    image, _, scene = render(spec, item.attributes, cfg.image_size, rng, shift)
    return image, scene
