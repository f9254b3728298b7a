"""Nearest-neighbour resampling of label maps onto an image grid in physical space."""

from __future__ import annotations

import numpy as np

# Voxel coordinates within this distance (in voxels) of an integer count as on the grid.
_GRID_EPS = 1e-3


def resample_label_nearest(
    label_xyz: np.ndarray, label_affine: np.ndarray, image_shape: tuple[int, ...], image_affine: np.ndarray
) -> tuple[np.ndarray, float]:
    """Sample ``label_xyz`` at every image voxel centre (nearest neighbour, 0 outside).

    Both affines map (i, j, k) voxel indices to the same patient frame. Returns the resampled map
    on the image grid and the fraction of image voxels whose centre lies inside the label volume.
    """
    shape = tuple(image_shape[:3])
    if label_xyz.shape == shape and np.allclose(label_affine, image_affine, atol=1e-4):
        return label_xyz.copy(), 1.0
    to_label = np.linalg.inv(label_affine) @ image_affine
    out = np.zeros(shape, dtype=label_xyz.dtype)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    plane = np.stack([i.ravel(), j.ravel(), np.zeros(i.size), np.ones(i.size)])
    inside_count = 0
    for k in range(shape[2]):
        plane[2] = k
        coords = to_label[:3] @ plane
        # floor(x + 0.5) rounds halves up consistently; the epsilon absorbs float noise at voxel centres.
        index = np.floor(coords + 0.5 + _GRID_EPS).astype(np.int64)
        inside = np.all((index >= 0) & (index < np.array(label_xyz.shape[:3])[:, None]), axis=0)
        inside_count += int(inside.sum())
        values = np.zeros(i.size, dtype=label_xyz.dtype)
        values[inside] = label_xyz[index[0, inside], index[1, inside], index[2, inside]]
        out[:, :, k] = values.reshape(shape[0], shape[1])
    return out, inside_count / float(np.prod(shape))
