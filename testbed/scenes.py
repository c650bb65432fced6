"""The testbed's world: flat-colour shapes on white, a caption grammar, and a renderer, all deterministic.

A scene is one shape at a position ("a large red circle on the left") or two shapes of different
colours in a relation ("a small blue square above a green triangle"; the second shape's size is
free). :func:`render` draws the scene a caption describes, jittered by a seed, hard-edged in the six
pure colours, so that the checker (:mod:`testbed.checker`) can tell from pixels alone whether an
image shows what its caption says. Nothing is downloaded: the data set is this module plus a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")
RELATIONS = ("to the left of", "above")
#: half the extent of a shape, in pixels, per size (the checker's size boundary lies between them)
HALF_EXTENT = {"small": 7, "large": 12}
#: where a lone shape's centre is drawn (x, y), before jitter
POSITION_CENTRES = {"on the left": (16, 32), "on the right": (48, 32), "at the top": (32, 16),
                    "at the bottom": (32, 48), "in the centre": (32, 32)}
JITTER = 2


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str | None  # None: the caption leaves it free (the second shape of a relation)

    def phrase(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)


@dataclass(frozen=True)
class Scene:
    """What a caption says: one shape and a position, or two shapes and a relation (first REL second)."""

    first: Shape
    position: str | None = None
    relation: str | None = None
    second: Shape | None = None

    @property
    def kind(self) -> str:
        return "one" if self.second is None else "two"

    def caption(self) -> str:
        if self.second is None:
            return f"a {self.first.phrase()} {self.position}"
        return f"a {self.first.phrase()} {self.relation} a {self.second.phrase()}"


def all_scenes() -> list[Scene]:
    """Every caption of the grammar, in a fixed order: 180 one-shape, then 1,080 two-shape scenes."""
    scenes = [Scene(Shape(c, s, z), position=p) for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS]
    for c1 in COLOURS:
        for s1 in SHAPES:
            for z1 in SIZES:
                for rel in RELATIONS:
                    for c2 in COLOURS:
                        if c2 == c1:
                            continue
                        for s2 in SHAPES:
                            scenes.append(Scene(Shape(c1, s1, z1), relation=rel, second=Shape(c2, s2, None)))
    return scenes


def parse_caption(caption: str) -> Scene:
    """The scene a grammar caption describes; ``ValueError`` for text outside the grammar."""
    scene = _BY_CAPTION.get(caption.strip())
    if scene is None:
        raise ValueError(f"not a testbed caption: {caption!r}")
    return scene


_BY_CAPTION = {scene.caption(): scene for scene in all_scenes()}


def _shape_mask(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    """Pixels (sampled at their centres) inside ``shape`` centred at (cx, cy) with half-extent ``half``."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        side = 0.9 * half  # equal-ish area to the circle, so size is the shape's extent, not its area
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    # upright isosceles triangle: apex at the top, base at the bottom, as wide as it is tall
    inside_rows = (dy >= -half) & (dy <= half)
    return inside_rows & (np.abs(dx) <= (dy + half) / 2)


def _place(scene: Scene, rng: random.Random) -> list[tuple[Shape, str, float, float, float]]:
    """(shape, size, cx, cy, half) for each shape of ``scene``, jittered by ``rng``."""
    def jitter() -> float:
        return rng.uniform(-JITTER, JITTER)

    first_size = scene.first.size or rng.choice(SIZES)
    if scene.second is None:
        cx, cy = POSITION_CENTRES[scene.position]
        return [(scene.first, first_size, cx + jitter(), cy + jitter(), HALF_EXTENT[first_size])]
    second_size = scene.second.size or rng.choice(SIZES)
    along_a, along_b, across = 16 + jitter(), 48 + jitter(), 32 + 2 * jitter()
    across_b = across + jitter()
    if scene.relation == "to the left of":
        a, b = (along_a, across), (along_b, across_b)
    else:  # above: the first shape's centre higher in the image (smaller y)
        a, b = (across, along_a), (across_b, along_b)
    return [(scene.first, first_size, *a, HALF_EXTENT[first_size]),
            (scene.second, second_size, *b, HALF_EXTENT[second_size])]


def render(scene: Scene, seed: int) -> np.ndarray:
    """The scene as a ``(64, 64, 3)`` uint8 image: white background, hard-edged pure colours, jittered by ``seed``."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    for shape, _size, cx, cy, half in _place(scene, random.Random(seed)):
        image[_shape_mask(shape.shape, cx, cy, half)] = COLOURS[shape.colour]
    return image


def render_caption(caption: str, seed: int) -> np.ndarray:
    return render(parse_caption(caption), seed)
