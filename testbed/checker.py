"""Caption accuracy: does an image show what its testbed caption says? Judged from pixels, per attribute.

Each pixel is given the nearest of white, black and the six pure colours; the largest 4-connected
blob of each colour (>= :data:`MIN_PIXELS`) is an object. Its shape is read from two features that a
blurred drawing keeps (a VAE's, a model's): the taper (an upright triangle has three quarters of its
pixels in its lower half) and how full the corner cells of its bounding box are (a square's are, a
circle's are not); its size from its extent (small shapes are 12-14 px across, large ones 22-24), its
position from its centroid. Attributes:

* ``colour``: exactly the caption's colours are present;
* ``shape`` / ``size``: of the object(s) in the caption's colour(s) (the second shape's size is free);
* ``position`` (one shape) or ``relation`` (two shapes), reported together as ``placement``;
* ``all``: every attribute right.

On real rendered scenes it accepts every true caption and rejects captions with one attribute
changed (tests check both), so on generated images it measures what the model got right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .scenes import COLOURS, IMAGE_SIZE, Scene, parse_caption

ATTRIBUTES = ("colour", "shape", "size", "placement", "all")
MIN_PIXELS = 20
_PALETTE_NAMES = ("white", "black") + tuple(COLOURS)
_PALETTE = np.array([(255, 255, 255), (0, 0, 0)] + list(COLOURS.values()), dtype=np.float32)
#: extent (px) between small (<=14) and large (>=21.6) shapes
SIZE_BOUNDARY = 18.0
#: taper between symmetric shapes (0) and the upright triangle (0.5); corner fill between circle and square
TAPER_BOUNDARY = 0.25
CORNER_BOUNDARY = 0.57
CENTRE_RADIUS = 8.0
RELATION_MARGIN = 8.0


@dataclass(frozen=True)
class Blob:
    colour: str
    pixels: int
    cx: float
    cy: float
    width: int
    height: int
    taper: float  # (bottom-half pixels - top-half pixels) / pixels: ~0.5 for an upright triangle, ~0 otherwise
    corner_fill: float  # filled share of the bounding box's four corner cells: ~1 square, ~0.2 circle

    @property
    def fill(self) -> float:
        return self.pixels / (self.width * self.height)

    @property
    def shape(self) -> str:
        if self.taper > TAPER_BOUNDARY:
            return "triangle"
        return "square" if self.corner_fill > CORNER_BOUNDARY else "circle"

    @property
    def size(self) -> str:
        return "large" if max(self.width, self.height) >= SIZE_BOUNDARY else "small"

    @property
    def position(self) -> str:
        dx, dy = self.cx - IMAGE_SIZE / 2, self.cy - IMAGE_SIZE / 2
        if max(abs(dx), abs(dy)) < CENTRE_RADIUS:
            return "in the centre"
        if abs(dx) >= abs(dy):
            return "on the left" if dx < 0 else "on the right"
        return "at the top" if dy < 0 else "at the bottom"


def detect(image: np.ndarray) -> dict[str, Blob]:
    """The largest blob of each colour in a ``(H, W, 3)`` uint8 image, by colour name."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    nearest = ((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1).argmin(1).reshape(image.shape[:2])
    blobs = {}
    for k, name in enumerate(_PALETTE_NAMES[2:], start=2):
        mask = nearest == k
        if mask.sum() < MIN_PIXELS:
            continue
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:]
        biggest = labels == (int(sizes.argmax()) + 1)
        if biggest.sum() < MIN_PIXELS:
            continue
        blobs[name] = _blob(name, biggest)
    return blobs


def _blob(name: str, mask: np.ndarray) -> Blob:
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    mid = (ys.min() + ys.max()) / 2
    taper = (np.sum(ys > mid) - np.sum(ys < mid)) / len(ys)
    ch, cw = max(1, h // 4), max(1, w // 4)
    corners = [box[:ch, :cw], box[:ch, -cw:], box[-ch:, :cw], box[-ch:, -cw:]]
    corner_fill = float(np.mean([c.mean() for c in corners]))
    return Blob(name, int(mask.sum()), float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, w, h, float(taper), corner_fill)


def _relation_holds(relation: str, a: Blob, b: Blob) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if relation == "to the left of":
        return dx > RELATION_MARGIN and abs(dx) > abs(dy)
    return dy > RELATION_MARGIN and abs(dy) > abs(dx)


def judge_scene(scene: Scene, image: np.ndarray) -> dict[str, bool]:
    """Per-attribute verdicts (:data:`ATTRIBUTES`) of ``image`` against ``scene``."""
    blobs = detect(image)
    wanted = [scene.first] + ([scene.second] if scene.second else [])
    found = [blobs.get(s.colour) for s in wanted]
    verdict = {"colour": set(blobs) == {s.colour for s in wanted},
               "shape": all(b is not None and b.shape == s.shape for b, s in zip(found, wanted)),
               "size": found[0] is not None and found[0].size == scene.first.size}
    if scene.second is None:
        verdict["placement"] = found[0] is not None and found[0].position == scene.position
    else:
        verdict["placement"] = None not in found and _relation_holds(scene.relation, found[0], found[1])
    verdict["all"] = all(verdict.values())
    return verdict


def judge(caption: str, image: np.ndarray) -> dict[str, bool]:
    return judge_scene(parse_caption(caption), image)


def caption_accuracy(captions: list[str], images: list[np.ndarray]) -> dict:
    """Share of images right per attribute, overall and split by one-shape / two-shape captions."""
    return summarize_verdicts(captions, [judge(c, im) for c, im in zip(captions, images)])


def summarize_verdicts(captions: list[str], verdicts: list[dict[str, bool]]) -> dict:
    """:func:`caption_accuracy` from verdicts already judged."""
    rows = [(parse_caption(c).kind, v) for c, v in zip(captions, verdicts)]
    out: dict = {}
    for group in ("all", "one", "two"):
        chosen = [v for kind, v in rows if group == "all" or kind == group]
        out[{"all": "overall", "one": "one_shape", "two": "two_shapes"}[group]] = {
            "n": len(chosen), **{a: (float(np.mean([v[a] for v in chosen])) if chosen else None) for a in ATTRIBUTES}}
    return out

