"""Tile reading for preparation; the implementation ships with the jobs so training reads tiles the same way."""

from fedimaging_app.tiles import WHITE, composite_on_white, read_tile

__all__ = ["WHITE", "composite_on_white", "read_tile"]
