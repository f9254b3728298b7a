"""Synthetic H&E whole-slide images with tumour and stroma regions and their QuPath annotations.

Layout under ``out``::

    slides/<name>.tiff               pyramidal tiled TIFF (256 x 256 tiles, deflate): level 0 at
                                     0.5 µm/px, then downsample 4 and 16 as further pages
    annotations/<name>.geojson       QuPath-style FeatureCollection of the regions, level-0 pixels

The pyramid levels are separate pages because OpenSlide's generic-tiff reader does not list SubIFDs
as levels (checked with OpenSlide 4.0.1 from openslide-bin). The resolution is in XResolution and
YResolution with ResolutionUnit CENTIMETER, which OpenSlide reports as ``openslide.mpp-x/y``.

Each slide shows a few tissue fragments on a white background. Inside a fragment, stroma has pink
fibrous texture with sparse elongated nuclei, and a tumour nest has dense, irregular, dark nuclei on
a pale purple background. The annotation polygons are exactly the drawn regions: "Tumour" for each
nest and "Stroma" for each fragment with its nests cut out as holes. Colours follow the
Beer-Lambert law from haematoxylin and eosin concentrations, and each site changes the hue,
saturation and intensity of both stains (``STAIN_PROFILES``, chosen by ``site_index`` modulo 3).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw
from shapely.geometry import Polygon, mapping
from shapely.geometry.polygon import orient

MPP = 0.5
DOWNSAMPLES = (1, 4, 16)
TIFF_TILE = 256
CLASSES = ("Tumour", "Stroma")
# RGB colours of QuPath's default "Tumor" and "Stroma" classes.
CLASS_COLOURS = {"Tumour": [200, 0, 0], "Stroma": [150, 200, 150]}
# Optical-density (RGB) vectors of haematoxylin and eosin: the reference stain vectors of Macenko
# normalisation as torchstain ships them (HERef of its Macenko normalisers).
HAEMATOXYLIN_OD = np.array([0.5626, 0.7201, 0.4062])
EOSIN_OD = np.array([0.2159, 0.8012, 0.5581])
BACKGROUND_RGB = 248.0


@dataclass(frozen=True)
class StainProfile:
    """Per-site change of one stain: hue rotation in degrees, saturation and intensity factors."""

    hue_deg: float
    saturation: float
    intensity: float


STAIN_PROFILES = (
    {"haematoxylin": StainProfile(0.0, 1.0, 1.0), "eosin": StainProfile(0.0, 1.0, 1.0)},
    {"haematoxylin": StainProfile(12.0, 1.1, 1.2), "eosin": StainProfile(-10.0, 1.0, 1.15)},
    {"haematoxylin": StainProfile(-10.0, 0.85, 0.8), "eosin": StainProfile(15.0, 0.8, 0.85)},
)


def _stain_vector(base: np.ndarray, profile: StainProfile) -> np.ndarray:
    """Rotate an optical-density vector about the grey axis (hue), scale its colour part (saturation)
    and its length (intensity)."""
    grey = np.ones(3) / np.sqrt(3.0)
    angle = np.deg2rad(profile.hue_deg)
    # Rodrigues' rotation about the grey axis.
    rotated = (base * np.cos(angle) + np.cross(grey, base) * np.sin(angle)
               + grey * np.dot(grey, base) * (1.0 - np.cos(angle)))
    along_grey = grey * np.dot(grey, rotated)
    vector = along_grey + profile.saturation * (rotated - along_grey)
    vector = np.clip(vector, 0.01, None)
    return vector / np.linalg.norm(vector) * np.linalg.norm(base) * profile.intensity


def _radial_polygon(rng: np.random.Generator, centre: tuple[float, float], radius: float, aspect: float,
                    angle: float, roughness: float, n_vertices: int = 72) -> Polygon:
    """Build an irregular, star-shaped outline: a rotated ellipse whose radius varies with low harmonics."""
    theta = np.linspace(0.0, 2.0 * np.pi, n_vertices, endpoint=False)
    scale = np.ones_like(theta)
    for harmonic in range(2, 7):
        scale += rng.normal(0.0, roughness / harmonic) * np.cos(harmonic * theta + rng.uniform(0.0, 2.0 * np.pi))
    scale = np.clip(scale, 0.6, 1.4)
    u, v = radius * scale * np.cos(theta), radius * aspect * scale * np.sin(theta)
    x = centre[0] + u * np.cos(angle) - v * np.sin(angle)
    y = centre[1] + u * np.sin(angle) + v * np.cos(angle)
    return Polygon(np.round(np.column_stack([x, y])))


def _layout(rng: np.random.Generator, width: int, height: int) -> list[tuple[Polygon, list[Polygon]]]:
    """Place two or three non-overlapping tissue fragments, most of them with one tumour nest.

    A nest sits off-centre in its fragment, so the stroma beside it is wide enough for whole tiles.
    """
    side = min(width, height)
    margin = 0.03 * side
    frame = Polygon([(margin, margin), (width - margin, margin), (width - margin, height - margin),
                     (margin, height - margin)])
    fragments: list[tuple[Polygon, tuple[float, float], float, float, float]] = []
    for _ in range(int(rng.integers(2, 4))):
        for _attempt in range(80):
            radius, aspect, angle = side * rng.uniform(0.2, 0.27), rng.uniform(0.75, 1.0), rng.uniform(0.0, np.pi)
            centre = (rng.uniform(0.0, width), rng.uniform(0.0, height))
            blob = _radial_polygon(rng, centre, radius, aspect, angle, 0.12)
            if frame.contains(blob) and all(blob.distance(other[0]) > margin for other in fragments):
                fragments.append((blob, centre, radius, aspect, angle))
                break
    if not fragments:
        # No random place fitted: one centred fragment always does.
        centre, radius = (width / 2, height / 2), 0.3 * side
        fragments.append((_radial_polygon(rng, centre, radius, 0.9, 0.0, 0.05), centre, radius, 0.9, 0.0))

    layout = []
    for index, (blob, centre, radius, aspect, angle) in enumerate(fragments):
        nests: list[Polygon] = []
        # Every slide gets a nest in its first fragment, and other fragments may be stroma only.
        if index == 0 or rng.uniform() < 0.8:
            inside = blob.buffer(-0.06 * radius)
            for _attempt in range(40):
                direction = rng.uniform(0.0, 2.0 * np.pi)
                shift = radius * rng.uniform(0.1, 0.2)
                nest_centre = (centre[0] + shift * np.cos(direction), centre[1] + shift * aspect * np.sin(direction))
                nest = _radial_polygon(rng, nest_centre, radius * rng.uniform(0.62, 0.75), aspect,
                                       angle + rng.uniform(-0.2, 0.2), 0.15)
                if inside.contains(nest):
                    nests.append(nest)
                    break
            if not nests:
                # Scaling the fragment about its star centre keeps the nest inside it.
                coords = np.asarray(blob.exterior.coords)[:-1]
                nests.append(Polygon(np.round(np.asarray(centre) + 0.55 * (coords - np.asarray(centre)))))
        layout.append((blob, nests))
    return layout


def _rasterize(layout: list[tuple[Polygon, list[Polygon]]], width: int, height: int) -> np.ndarray:
    """Region map at level 0: 0 background, 2 * i + 1 stroma and 2 * i + 2 tumour of fragment i."""
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    for index, (blob, nests) in enumerate(layout):
        draw.polygon([tuple(p) for p in np.asarray(blob.exterior.coords)[:-1]], fill=2 * index + 1)
        for nest in nests:
            draw.polygon([tuple(p) for p in np.asarray(nest.exterior.coords)[:-1]], fill=2 * index + 2)
    return np.asarray(image)


class _SmoothNoise:
    """Smooth Gaussian noise over the slide with unit variance that varies over about ``cell`` pixels.

    Noise on a coarse grid is interpolated with Gaussian weights, one matrix product per axis, so any
    window can be evaluated alone and matches the same window of the whole field.
    """

    def __init__(self, rng: np.random.Generator, width: int, height: int, cell: int):
        self.coarse = rng.standard_normal(size=(height // cell + 3, width // cell + 3), dtype=np.float32)
        self.row_weights = self._weights(height, self.coarse.shape[0], cell)
        self.column_weights = self._weights(width, self.coarse.shape[1], cell)

    @staticmethod
    def _weights(length: int, nodes: int, cell: int) -> np.ndarray:
        distance = (np.arange(length, dtype=np.float32)[:, None] / cell + 1.0) - np.arange(nodes, dtype=np.float32)
        weights = np.exp(-(distance ** 2))
        return weights / np.sqrt((weights ** 2).sum(axis=1, keepdims=True))

    def window(self, rows: slice, columns: slice) -> np.ndarray:
        return self.row_weights[rows] @ self.coarse @ self.column_weights[columns].T


def _nucleus_stamps(rng: np.random.Generator, count: int, radius: tuple[float, float], aspect: tuple[float, float],
                    angle: tuple[float, float], roughness: float) -> list[np.ndarray]:
    """Soft-edged nucleus shapes (values 0 to 1) with irregular outlines and granular chromatin."""
    stamps = []
    for _ in range(count):
        r = rng.uniform(*radius)
        ratio = rng.uniform(*aspect)
        theta0 = rng.uniform(*angle)
        half = int(np.ceil(r * max(ratio, 1.0) * 1.5)) + 1
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
        u = xx * np.cos(theta0) + yy * np.sin(theta0)
        v = -xx * np.sin(theta0) + yy * np.cos(theta0)
        phi = np.arctan2(v, u)
        boundary = np.ones_like(phi)
        for harmonic in range(2, 6):
            boundary += rng.normal(0.0, roughness / harmonic) * np.cos(harmonic * phi + rng.uniform(0, 2 * np.pi))
        distance = np.sqrt((u / (r * ratio)) ** 2 + (v / r) ** 2) / boundary
        body = np.clip((1.15 - distance) / 0.3, 0.0, 1.0)
        chromatin = 0.75 + 0.25 * rng.uniform(size=body.shape).astype(np.float32)
        stamps.append(body * chromatin)
    return stamps


def _scatter(layer: np.ndarray, mask: np.ndarray, rng: np.random.Generator, stamps: list[np.ndarray],
             spacing: float, strength: tuple[float, float]) -> int:
    """Place nuclei on a jittered grid wherever ``mask`` is True at the centre, and return their count."""
    height, width = layer.shape
    ys, xs = np.mgrid[spacing / 2:height:spacing, spacing / 2:width:spacing]
    xs = (xs + rng.uniform(-0.45, 0.45, xs.shape) * spacing).astype(int).ravel()
    ys = (ys + rng.uniform(-0.45, 0.45, ys.shape) * spacing).astype(int).ravel()
    keep = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    xs, ys = xs[keep], ys[keep]
    keep = mask[ys, xs]
    xs, ys = xs[keep], ys[keep]
    choices = rng.integers(0, len(stamps), size=len(xs))
    weights = rng.uniform(*strength, size=len(xs)).astype(np.float32)
    for x, y, choice, weight in zip(xs, ys, choices, weights):
        stamp = stamps[choice]
        half = stamp.shape[0] // 2
        y0, y1, x0, x1 = y - half, y + half + 1, x - half, x + half + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = stamp.shape[0] - max(0, y1 - height), stamp.shape[1] - max(0, x1 - width)
        window = layer[max(0, y0):min(height, y1), max(0, x0):min(width, x1)]
        np.maximum(window, weight * stamp[sy0:sy1, sx0:sx1], out=window)
    return len(xs)


def _paint(rng: np.random.Generator, regions: np.ndarray, layout: list[tuple[Polygon, list[Polygon]]],
           haematoxylin: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """Render the H&E image (rows, columns, 3) uint8 from the region map of ``_rasterize``.

    Each fragment is painted inside its bounding box, and only its own pixels are written, so the
    background keeps the value BACKGROUND_RGB.
    """
    height, width = regions.shape
    rgb = np.full((height, width, 3), round(BACKGROUND_RGB), dtype=np.uint8)
    warp = _SmoothNoise(rng, width, height, 96)
    stain_strength = _SmoothNoise(rng, width, height, 128)
    tumour_stamps = _nucleus_stamps(rng, 24, (6.0, 10.0), (1.0, 1.5), (0.0, np.pi), 0.35)
    for index, (blob, _) in enumerate(layout):
        x0, y0, x1, y1 = (int(v) for v in blob.bounds)
        rows, columns = slice(max(0, y0), min(height, y1 + 1)), slice(max(0, x0), min(width, x1 + 1))
        stroma = regions[rows, columns] == 2 * index + 1
        tumour = regions[rows, columns] == 2 * index + 2

        # Stroma: collagen fibres as a sine pattern across ``angle``, bent by smooth noise, so the
        # fibres and their elongated nuclei run along angle + 90°.
        angle = rng.uniform(0.0, np.pi)
        ys = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None]
        xs = np.arange(columns.start, columns.stop, dtype=np.float32)[None, :]
        phase = (xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))) * np.float32(2 * np.pi / 18.0)
        fibres = 0.5 + 0.5 * np.sin(phase + 2.5 * warp.window(rows, columns))
        c_eosin = np.where(stroma, 0.45 + 0.45 * fibres ** 2, np.float32(0.30))
        c_haem = np.where(stroma, np.float32(0.05), np.float32(0.30))

        nuclei = np.zeros(stroma.shape, dtype=np.float32)
        along = angle + np.pi / 2
        stroma_stamps = _nucleus_stamps(rng, 8, (2.5, 3.5), (3.0, 4.5), (along - 0.25, along + 0.25), 0.1)
        _scatter(nuclei, stroma, rng, stroma_stamps, 70.0, (1.0, 1.4))
        _scatter(nuclei, tumour, rng, tumour_stamps, 19.0, (1.3, 1.9))

        modulation = (1.0 + 0.12 * stain_strength.window(rows, columns)) * (
            1.0 + 0.08 * rng.standard_normal(size=stroma.shape, dtype=np.float32))
        c_haem = np.maximum((c_haem + nuclei) * modulation, 0.0)
        c_eosin = np.maximum(c_eosin * (1.0 - 0.5 * np.clip(nuclei, 0.0, 1.0)) * modulation, 0.0)
        own = stroma | tumour
        target = rgb[rows, columns]
        for channel in range(3):
            optical_density = c_haem * np.float32(haematoxylin[channel]) + c_eosin * np.float32(eosin[channel])
            value = np.clip(np.rint(BACKGROUND_RGB * np.exp(-optical_density)), 0, 255).astype(np.uint8)
            target[..., channel][own] = value[own]
    return rgb


def _downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Block mean over ``factor`` x ``factor`` pixels (Pillow's ``Image.reduce``)."""
    return np.asarray(Image.fromarray(rgb).reduce(factor))


def _write_tiff(path: Path, rgb: np.ndarray) -> None:
    pixels_per_cm = 1.0e4 / MPP
    levels = [rgb]
    for previous, downsample in zip(DOWNSAMPLES, DOWNSAMPLES[1:]):
        levels.append(_downsample(levels[-1], downsample // previous))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tiff:
        for level, (pixels, downsample) in enumerate(zip(levels, DOWNSAMPLES)):
            # Deflate level 1 wrote a 4096 x 3072 slide about three times faster than the default level,
            # for a file 3 % larger.
            tiff.write(
                pixels, photometric="rgb", tile=(TIFF_TILE, TIFF_TILE),
                compression="zlib", compressionargs={"level": 1},
                resolution=(pixels_per_cm / downsample, pixels_per_cm / downsample), resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1, metadata=None, software="fedimaging demo",
                description="Synthetic H&E slide made by fedimaging.demo, not real tissue" if level == 0 else None,
            )


def _feature(rng: np.random.Generator, polygon: Polygon, class_name: str) -> dict:
    geometry = mapping(orient(polygon, sign=1.0))
    return {
        "type": "Feature",
        "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
        "geometry": {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in ring]
                                                         for ring in geometry["coordinates"]]},
        "properties": {"objectType": "annotation",
                       "classification": {"name": class_name, "color": CLASS_COLOURS[class_name]}},
    }


def generate_pathology_site(out: Path, *, site_index: int, n_slides: int, seed: int,
                            size: tuple[int, int] = (4096, 3072)) -> dict:
    """Write one site's slides under ``out/slides`` and their annotations under ``out/annotations``.

    ``size`` is the level-0 (width, height) in pixels at 0.5 µm/px. ``site_index`` (0, 1, 2, ...)
    picks the stain profile and numbers the site (``site_index + 1`` in file names). Existing files
    of the same names are overwritten. Raises ``ValueError`` for invalid arguments.

    Returns a JSON-serialisable summary: folders and per-slide paths (as strings), the resolution,
    pyramid downsamples, class names, the site's stain vectors and per-slide region counts.
    """
    if site_index < 0:
        raise ValueError(f"invalid site_index {site_index}: must be 0 or more")
    if n_slides < 1:
        raise ValueError(f"invalid n_slides {n_slides}: must be at least 1")
    if seed < 0:
        raise ValueError(f"invalid seed {seed}: must be 0 or more")
    width, height = (int(v) for v in size)
    if width < 1024 or height < 1024:
        raise ValueError(f"invalid size {tuple(size)}: width and height must be at least 1024 pixels")

    out = Path(out)
    site = site_index + 1
    stains = STAIN_PROFILES[site_index % len(STAIN_PROFILES)]
    haematoxylin = _stain_vector(HAEMATOXYLIN_OD, stains["haematoxylin"])
    eosin = _stain_vector(EOSIN_OD, stains["eosin"])

    slides = []
    for slide_number in range(1, n_slides + 1):
        name = f"site{site}-slide{slide_number:02d}"
        layout_rng, paint_rng, id_rng = (np.random.default_rng(s) for s in
                                         np.random.SeedSequence([seed, site_index, slide_number]).spawn(3))
        layout = _layout(layout_rng, width, height)
        regions = _rasterize(layout, width, height)
        rgb = _paint(paint_rng, regions, layout, haematoxylin, eosin)
        slide_path = out / "slides" / f"{name}.tiff"
        _write_tiff(slide_path, rgb)

        features = []
        for blob, nests in layout:
            features += [_feature(id_rng, nest, "Tumour") for nest in nests]
        for blob, nests in layout:
            stroma = Polygon(blob.exterior.coords, [nest.exterior.coords for nest in nests])
            features.append(_feature(id_rng, stroma, "Stroma"))
        annotation_path = out / "annotations" / f"{name}.geojson"
        annotation_path.parent.mkdir(parents=True, exist_ok=True)
        annotation_path.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=1) + "\n")
        slides.append({
            "name": name,
            "slide": str(slide_path),
            "annotation": str(annotation_path),
            "size": [width, height],
            "regions": {"Tumour": sum(len(nests) for _, nests in layout), "Stroma": len(layout)},
            "area_fraction": {"Tumour": round(float(np.mean((regions > 0) & (regions % 2 == 0))), 4),
                              "Stroma": round(float(np.mean(regions % 2 == 1)), 4)},
        })
    return {
        "site_index": site_index,
        "site_name": f"site-{site}",
        "slides_dir": str(out / "slides"),
        "annotations_dir": str(out / "annotations"),
        "mpp": MPP,
        "downsamples": list(DOWNSAMPLES),
        "classes": list(CLASSES),
        "stain": {
            "profile": {stain: asdict(profile) for stain, profile in stains.items()},
            "haematoxylin_od": [round(float(v), 4) for v in haematoxylin],
            "eosin_od": [round(float(v), 4) for v in eosin],
        },
        "slides": slides,
    }
