"""Tile reading for preparation; the implementation ships with the jobs so training reads tiles the same way."""

from fedimaging_app.tiles import WHITE, read_tile

__all__ = ["WHITE", "read_tile"]
