"""Compare prepared volumes with reference volumes in world coordinates."""

from __future__ import annotations

import nibabel as nib
import numpy as np


def load(path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def map_reference_voxels(ours_affine, ours_shape, ref_affine, ref_shape, tolerance_mm):
    """Map every reference voxel centre to our voxel grid.

    Returns integer indices into our array, shape (3, N), after asserting that each reference
    voxel centre coincides with one of our voxel centres within ``tolerance_mm``.
    """
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in ref_shape[:3]], indexing="ij"), axis=0).reshape(3, -1)
    homogeneous = np.vstack([grid, np.ones(grid.shape[1])])
    world = (ref_affine @ homogeneous)[:3]
    ours_index = (np.linalg.inv(ours_affine) @ np.vstack([world, np.ones(world.shape[1])]))[:3]
    rounded = np.round(ours_index)
    ours_world = (ours_affine @ np.vstack([rounded, np.ones(rounded.shape[1])]))[:3]
    distance = np.linalg.norm(ours_world - world, axis=0)
    assert distance.max() <= tolerance_mm, f"voxel centres differ by up to {distance.max():.4f} mm"
    rounded = rounded.astype(int)
    for axis in range(3):
        assert rounded[axis].min() >= 0 and rounded[axis].max() < ours_shape[axis], "reference voxel outside our grid"
    return grid, rounded
