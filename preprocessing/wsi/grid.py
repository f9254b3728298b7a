"""Tile grids in level-0 coordinates.

A tile covers ``tile_size`` output pixels at the effective mpp. It is read from ``level`` as a region
of ``read_size`` level pixels starting at the level-0 ``location`` of its top-left corner (OpenSlide's
``read_region`` convention), then resized to ``tile_size`` when the level's mpp is not the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from preprocessing.wsi.resolution import LevelChoice


@dataclass(frozen=True)
class Tile:
    """One grid cell: column/row index, level-0 top-left corner and level-0 extent."""

    column: int
    row: int
    x0: int
    y0: int
    width0: float
    height0: float


@dataclass(frozen=True)
class Grid:
    """The tiles of one slide and how to read them."""

    tiles: list[Tile]
    columns: int
    rows: int
    level: int
    read_size: tuple[int, int]
    tile_size: int


def tile_grid(level0_size: tuple[int, int], level_size: tuple[int, int], choice: LevelChoice,
              tile_size: int, target_mpp: float) -> Grid:
    """Cover the whole slide with tiles; the last row and column may extend past the border."""
    if choice.resample:
        # Step and extent follow the target mpp; the region read at the level is slightly larger or smaller.
        step_x = tile_size * target_mpp / (choice.level_mpp_xy[0] / choice.downsample_xy[0])
        step_y = tile_size * target_mpp / (choice.level_mpp_xy[1] / choice.downsample_xy[1])
        read_size = (
            max(1, round(tile_size * target_mpp / choice.level_mpp_xy[0])),
            max(1, round(tile_size * target_mpp / choice.level_mpp_xy[1])),
        )
        columns = math.ceil(level0_size[0] / step_x)
        rows = math.ceil(level0_size[1] / step_y)
    else:
        step_x = tile_size * choice.downsample_xy[0]
        step_y = tile_size * choice.downsample_xy[1]
        read_size = (tile_size, tile_size)
        columns = math.ceil(level_size[0] / tile_size)
        rows = math.ceil(level_size[1] / tile_size)
    tiles = [
        Tile(column, row, round(column * step_x), round(row * step_y), step_x, step_y)
        for row in range(rows)
        for column in range(columns)
    ]
    return Grid(tiles, columns, rows, choice.level, read_size, tile_size)
