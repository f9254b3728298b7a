"""Tissue detection on a low-resolution image of the slide.

Brightfield slides (white background) are thresholded with Otsu's method on HSV saturation;
fluorescence slides (dark background) with the triangle method on the brightest channel, because
stains such as DAPI light up one channel only and the dark background dominates the histogram. Both signals are smoothed first and the mask is closed, so sparse nuclei
in fluorescence count as the tissue around them. The mode is chosen from the brightness of the
thumbnail's border, where the background is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.color import rgb2gray, rgb2hsv
from skimage.filters import gaussian, threshold_otsu, threshold_triangle
from skimage.morphology import closing, disk

# Thresholds never go below these floors, so a slide without tissue does not turn noise into tissue.
MIN_SATURATION = 0.07
MIN_FLUORESCENCE_INTENSITY = 0.03
# Gaussian sigma, in thumbnail pixels, that spreads nuclei over the tissue between them.
FLUORESCENCE_SMOOTHING_PIXELS = 3.0


@dataclass
class TissueMask:
    """Boolean tissue mask and the scale from level-0 pixels to mask pixels."""

    mask: np.ndarray  # (rows, columns)
    scale_x: float  # mask pixels per level-0 pixel
    scale_y: float
    mode: str
    threshold: float

    def integral(self) -> np.ndarray:
        return np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))


def detect_mode(thumbnail_rgb: np.ndarray) -> str:
    """Return ``brightfield`` when the border of the thumbnail is bright, else ``fluorescence``."""
    grey = rgb2gray(thumbnail_rgb)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return "brightfield" if np.median(border) >= 0.5 else "fluorescence"


def tissue_mask(thumbnail_rgb: np.ndarray, level0_size: tuple[int, int], mode: str | None = None) -> TissueMask:
    """Detect tissue on an RGB thumbnail of the whole slide (``level0_size`` is width, height)."""
    mode = mode or detect_mode(thumbnail_rgb)
    if mode == "brightfield":
        signal = gaussian(rgb2hsv(thumbnail_rgb)[..., 1], sigma=1.0)
        floor = MIN_SATURATION
    else:
        signal = gaussian(thumbnail_rgb.max(axis=-1) / 255.0, sigma=FLUORESCENCE_SMOOTHING_PIXELS)
        floor = MIN_FLUORESCENCE_INTENSITY
    threshold = floor
    if np.ptp(signal) > 0:
        method = threshold_otsu if mode == "brightfield" else threshold_triangle
        threshold = max(float(method(signal)), floor)
    mask = closing(signal > threshold, disk(2))
    rows, columns = mask.shape
    return TissueMask(mask, columns / level0_size[0], rows / level0_size[1], mode, threshold)


def tissue_fractions(tissue: TissueMask, boxes_level0: np.ndarray) -> np.ndarray:
    """Fraction of each level-0 box (x0, y0, width, height) covered by tissue; outside the slide is not tissue."""
    integral = tissue.integral()
    rows, columns = tissue.mask.shape
    x0 = boxes_level0[:, 0] * tissue.scale_x
    y0 = boxes_level0[:, 1] * tissue.scale_y
    x1 = (boxes_level0[:, 0] + boxes_level0[:, 2]) * tissue.scale_x
    y1 = (boxes_level0[:, 1] + boxes_level0[:, 3]) * tissue.scale_y
    area = np.maximum((x1 - x0) * (y1 - y0), 1e-9)
    cx0, cy0 = np.clip(np.round(x0), 0, columns).astype(int), np.clip(np.round(y0), 0, rows).astype(int)
    cx1, cy1 = np.clip(np.round(x1), 0, columns).astype(int), np.clip(np.round(y1), 0, rows).astype(int)
    counts = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
    cells = np.maximum((cx1 - cx0) * (cy1 - cy0), 0)
    fractions = np.where(cells > 0, counts / np.maximum(area, cells), 0.0)
    # A box smaller than a mask pixel takes the value of the mask pixel under its centre.
    centre_x = np.clip(((x0 + x1) / 2).astype(int), 0, columns - 1)
    centre_y = np.clip(((y0 + y1) / 2).astype(int), 0, rows - 1)
    inside = ((x0 + x1) / 2 < columns) & ((y0 + y1) / 2 < rows)
    fractions = np.where(cells > 0, fractions, tissue.mask[centre_y, centre_x] & inside)
    return np.clip(fractions.astype(np.float64), 0.0, 1.0)
