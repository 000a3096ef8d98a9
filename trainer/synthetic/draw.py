"""Procedural drawing for the synthetic data sets: textured backgrounds, shape polygons, scenes.

Pure functions of a `numpy.random.Generator`, no file I/O: `trainer.synthetic` owns the COCO and
ImageFolder layouts and calls `draw_scene` / `draw_crop` here. Shapes are polygons rasterised with
pycocotools (not PIL) so that a polygon annotation decodes, through `COCO.annToMask`, to exactly the
pixels that were painted; objects are composited with those same masks, so image and labels agree
pixel for pixel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

# Shape classes, in label order; `trainer.synthetic.datasets.CATEGORIES` gives them (non-contiguous) COCO ids.
SHAPES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "star")
# The classification set (the ImageNet stand-in) has more classes than detection, as ImageNet has
# more than COCO: the detection shapes first (SHAPES is a prefix), then 12 more.
CLS_SHAPES: tuple[str, ...] = SHAPES + ("pentagon", "hexagon", "cross", "arrow", "crescent", "heart", "diamond",
                                        "star6", "lshape", "trapezoid", "semicircle", "star4")

# Object diameter as a fraction of the shorter image side: big enough for a small Mask R-CNN at
# 64 px to see the outline (a star needs ~12 px to still look like one), small enough for 6 to fit.
OBJECT_SCALE = (0.2, 0.45)
CROP_SCALE = (0.55, 0.9)  # classification crops: one labelled object, at varied scale
CLUTTER_SCALE = (0.1, 0.22)  # smaller distractor shapes of any class, drawn beneath it
MAX_CLUTTER = 2
# An object whose visible part is below both a fraction of its full area and a pixel floor is
# removed from the scene entirely (never painted), so nothing visible is left unannotated.
MIN_VISIBLE_FRAC = 0.3
MIN_VISIBLE_PX = 8
MIN_COLOUR_DIST = 90.0  # RGB distance between an object's colour and the background's mean


@dataclass
class Layer:
    """One annotated thing in z-order: a shape, or a crowd cluster of small shapes of one kind."""

    shape: int  # index into SHAPES
    full: np.ndarray  # bool HxW: every pixel of the layer, before occlusion
    fill: np.ndarray  # float32 HxWx3: the layer's texture, used where `full` is set
    polygon: list[float] | None  # flat [x1, y1, ...]; None for crowd clusters
    iscrowd: bool = False
    visible: np.ndarray | None = None  # bool HxW: `full` minus the layers above; set by the scene

    @property
    def occluded(self) -> bool:
        assert self.visible is not None
        return bool((self.full & ~self.visible).any())


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A colour far from `avoid`, so objects never vanish into their background."""
    for _ in range(20):
        c = _colour(rng)
        if float(np.linalg.norm(c - avoid)) >= MIN_COLOUR_DIST:
            return c
    return (255.0 - avoid).astype(np.float32)  # the complement is always far from a mid colour


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Add sensor-like noise once to the composited image and quantise to uint8.

    One noise field per image rather than per layer: it looks the same and sampling normals is the
    most expensive step of generation.
    """
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= 4.0
    noise += img
    return np.clip(noise, 0, 255, out=noise).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False  # shared between calls
    return yy, xx


def _ramp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Coordinate along a random direction, in pixels (HxW float32)."""
    yy, xx = _grid(h, w)
    a = rng.uniform(0, 2 * math.pi)
    return xx * math.cos(a) + yy * math.sin(a)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured HxWx3 float32 background: noise, gradient, stripes, checker or blobs."""
    kind = int(rng.integers(5))
    c0 = _colour(rng)
    # The second colour stays near the first: a busy but low-contrast background keeps shapes the
    # most salient thing in the image.
    c1 = np.clip(c0 + rng.uniform(-70, 70, size=3), 0, 255).astype(np.float32)
    if kind == 0:  # noise
        t = rng.random((h, w), dtype=np.float32)
    elif kind == 1:  # linear gradient
        r = _ramp(rng, h, w)
        t = (r - r.min()) / max(float(r.max() - r.min()), 1e-6)
    elif kind == 2:  # soft stripes
        period = rng.uniform(4, max(6.0, 0.3 * min(h, w)))
        t = 0.5 + 0.5 * np.sin(_ramp(rng, h, w) * (2 * math.pi / period))
    elif kind == 3:  # checker
        cell = int(rng.integers(3, max(4, min(h, w) // 5)))
        yy, xx = _grid(h, w)
        t = ((yy // cell) + (xx // cell)) % 2
    else:  # smooth colour blobs: a tiny random image upsampled
        small = rng.uniform(0, 255, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3))
        up = Image.fromarray(small.astype(np.uint8), "RGB").resize((w, h), Image.BILINEAR)
        blobs = np.asarray(up, dtype=np.float32)
        return 0.5 * blobs + 0.5 * c0
    return c0 + t[..., None] * (c1 - c0)


def object_fill(rng: np.random.Generator, h: int, w: int, avoid: np.ndarray) -> np.ndarray:
    """An object's texture over the whole canvas: solid, shaded or two-tone striped (HxWx3)."""
    c = _contrasting_colour(rng, avoid)
    kind = int(rng.integers(3))
    if kind == 0:
        return np.broadcast_to(c, (h, w, 3))  # read-only view: fills are only read
    elif kind == 1:  # lit from one side
        r = _ramp(rng, h, w)
        t = (r - r.min()) / max(float(r.max() - r.min()), 1e-6)
        return c * (0.65 + 0.35 * t[..., None])
    else:
        c2 = np.clip(c + rng.uniform(-60, 60, size=3), 0, 255)
        stripes = (np.sin(_ramp(rng, h, w) * (2 * math.pi / rng.uniform(3, 7))) > 0)[..., None]
        return np.where(stripes, c, c2).astype(np.float32)


def _regular(r: float, n: int, inner: float | None = None) -> np.ndarray:
    """A regular n-gon, or an n-pointed star whose inner radius is `inner` x r."""
    if inner is None:
        ang = np.arange(n) * (2 * math.pi / n)
        return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
    ang = np.arange(2 * n) * (math.pi / n)
    rad = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


def _outline(rng: np.random.Generator, name: str, r: float) -> np.ndarray:
    """The shape's vertices around the origin, inside radius r, before rotation (N x 2)."""
    if name == "ellipse":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return np.stack([r * np.cos(t), r * rng.uniform(0.55, 1.0) * np.sin(t)], axis=1)
    if name == "rectangle":
        phi = math.atan(rng.uniform(0.45, 1.0))  # aspect ratio as the half-diagonal's angle
        ang = np.array([phi, math.pi - phi, math.pi + phi, -phi])
        return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
    if name == "triangle":
        ang = np.arange(3) * (2 * math.pi / 3) + rng.uniform(-0.25, 0.25, size=3)
        rad = r * rng.uniform(0.85, 1.0, size=3)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    if name == "star":  # five-pointed
        return _regular(r, 5, rng.uniform(0.38, 0.5))
    return _outline_more(rng, name, r)


def _outline_more(rng: np.random.Generator, name: str, r: float) -> np.ndarray:
    """The classification-only shapes (CLS_SHAPES beyond SHAPES)."""
    if name in ("pentagon", "hexagon"):
        return _regular(r, 5 if name == "pentagon" else 6)
    if name in ("star6", "star4"):
        return _regular(r, 6 if name == "star6" else 4, rng.uniform(0.4, 0.55) if name == "star6" else
                        rng.uniform(0.3, 0.45))
    if name == "diamond":
        return np.array([[r, 0], [0, r * rng.uniform(0.45, 0.7)], [-r, 0], [0, -r * rng.uniform(0.45, 0.7)]])
    if name == "cross":
        w = r * rng.uniform(0.25, 0.4)
        return np.array([[w, r], [-w, r], [-w, w], [-r, w], [-r, -w], [-w, -w], [-w, -r], [w, -r], [w, -w], [r, -w],
                         [r, w], [w, w]]) * 0.9
    if name == "arrow":
        w, head = r * rng.uniform(0.2, 0.3), r * rng.uniform(0.1, 0.3)
        return np.array([[-r, -w], [head, -w], [head, -2.2 * w], [r, 0], [head, 2.2 * w], [head, w], [-r, w]])
    if name == "lshape":
        w = r * rng.uniform(0.35, 0.5)
        return np.array([[-r, -r], [-r + w, -r], [-r + w, r - w], [r, r - w], [r, r], [-r, r]]) * 0.7
    if name == "trapezoid":
        top = r * rng.uniform(0.3, 0.6)
        return np.array([[-r, 0.6 * r], [r, 0.6 * r], [top, -0.6 * r], [-top, -0.6 * r]])
    if name == "semicircle":
        t = np.linspace(0, math.pi, 17)
        return np.stack([r * np.cos(t), r * np.sin(t) - 0.4 * r], axis=1)
    if name == "crescent":  # the outer arc, then the inner arc back: a bite out of a disc
        t = np.linspace(-0.8 * math.pi, 0.8 * math.pi, 20)
        bite = rng.uniform(0.45, 0.7)
        outer = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        inner = np.stack([bite * r * np.cos(t[::-1]) + (1 - bite) * r * 0.6, 0.75 * r * np.sin(t[::-1])], axis=1)
        return np.concatenate([outer, inner])
    if name == "heart":
        t = np.linspace(0, 2 * math.pi, 28, endpoint=False)
        x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x, -y], axis=1) * (r / 17)
    raise ValueError(f"unknown shape {name!r}")


def shape_polygon(rng: np.random.Generator, shape: int, cx: float, cy: float, r: float) -> list[float]:
    """Vertices of a randomly rotated shape (index into CLS_SHAPES) inscribed in the circle (cx, cy, r),
    flat and rounded."""
    pts = _outline(rng, CLS_SHAPES[shape], r)
    rot = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(rot), math.sin(rot)
    pts = pts @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])
    # Rounded so the JSON holds exactly the coordinates that were rasterised.
    return np.round(pts.ravel(), 2).tolist()


def rasterize(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    """Union of polygons as a bool HxW mask, by the same code path as `COCO.annToMask`."""
    rle = mask_util.merge(mask_util.frPyObjects(polygons, h, w))
    return mask_util.decode(rle).astype(bool)


def _place(
    rng: np.random.Generator, h: int, w: int, scale: tuple[float, float]
) -> tuple[float, float, float]:
    """Centre and radius of a shape that lies fully inside the image."""
    r = 0.5 * min(h, w) * rng.uniform(*scale)
    return rng.uniform(r, w - r), rng.uniform(r, h - r), r


def _object_layer(rng: np.random.Generator, h: int, w: int, avoid: np.ndarray) -> Layer:
    shape = int(rng.integers(len(SHAPES)))
    poly = shape_polygon(rng, shape, *_place(rng, h, w, OBJECT_SCALE))
    return Layer(shape, rasterize([poly], h, w), object_fill(rng, h, w, avoid), poly)


def _crowd_layer(rng: np.random.Generator, h: int, w: int, avoid: np.ndarray) -> Layer:
    """A cluster of 6-12 small shapes of one kind: one iscrowd region, as in COCO's crowds."""
    shape = int(rng.integers(len(SHAPES)))
    side = min(h, w)
    cx, cy, spread = _place(rng, h, w, (0.3, 0.45))
    polys = []
    for _ in range(int(rng.integers(6, 13))):
        r = max(1.5, side * rng.uniform(0.03, 0.05))
        a, d = rng.uniform(0, 2 * math.pi), spread * math.sqrt(rng.random())
        x = min(max(cx + d * math.cos(a), r), w - r)
        y = min(max(cy + d * math.sin(a), r), h - r)
        polys.append(shape_polygon(rng, shape, x, y, r))
    return Layer(shape, rasterize(polys, h, w), object_fill(rng, h, w, avoid), None, iscrowd=True)


def _resolve_occlusion(layers: list[Layer]) -> list[Layer]:
    """Visible masks top-down; drop layers too hidden to annotate (they are then never painted)."""
    covered = np.zeros_like(layers[0].full) if layers else None
    kept: list[Layer] = []
    for layer in reversed(layers):
        visible = layer.full & ~covered
        area = int(visible.sum())
        full = int(layer.full.sum())
        floor = MIN_VISIBLE_PX if layer.iscrowd else max(MIN_VISIBLE_PX, MIN_VISIBLE_FRAC * full)
        # min(full, .): a tiny shape in a tiny image is kept when nothing hides it.
        if area == 0 or area < min(full, floor):
            continue
        layer.visible = visible
        covered |= layer.full
        kept.append(layer)
    return kept[::-1]


def draw_scene(
    rng: np.random.Generator, h: int, w: int, *, max_objects: int, empty_prob: float, crowd_prob: float
) -> tuple[np.ndarray, list[Layer]]:
    """One detection image (uint8 HxWx3) and its kept layers in z-order, bottom first."""
    empty = rng.random() < empty_prob
    crowd = rng.random() < crowd_prob
    n = int(rng.integers(1, max_objects + 1))
    bg = background(rng, h, w)
    avoid = bg.mean(axis=(0, 1))
    layers: list[Layer] = []
    if not empty:
        if crowd:  # crowds sit at the bottom, like a background audience
            layers.append(_crowd_layer(rng, h, w, avoid))
        layers.extend(_object_layer(rng, h, w, avoid) for _ in range(n))
    layers = _resolve_occlusion(layers)
    img = bg
    for layer in layers:
        img = np.where(layer.full[..., None], layer.fill, img)
    return _finish(rng, img), layers


def draw_crop(rng: np.random.Generator, shape: int, size: int, classes: int = len(CLS_SHAPES),
              first: int = 0) -> np.ndarray:
    """A classification crop (uint8 size x size x 3): one shape of class `shape` (index into CLS_SHAPES)
    on a textured background, above up to MAX_CLUTTER smaller distractors of any of the set's classes
    CLS_SHAPES[first:first + classes] (clutter, as in ImageNet photos: the label is the salient object)."""
    bg = background(rng, size, size)
    avoid = bg.mean(axis=(0, 1))
    img = bg
    for _ in range(int(rng.integers(MAX_CLUTTER + 1))):
        other = first + int(rng.integers(classes))
        poly = shape_polygon(rng, other, *_place(rng, size, size, CLUTTER_SCALE))
        img = np.where(rasterize([poly], size, size)[..., None], object_fill(rng, size, size, avoid), img)
    poly = shape_polygon(rng, shape, *_place(rng, size, size, CROP_SCALE))
    mask = rasterize([poly], size, size)
    fill = object_fill(rng, size, size, avoid)
    return _finish(rng, np.where(mask[..., None], fill, img))
