"""The tile loader that training uses, re-exported for users of the preparation step."""

from fedimaging_app.tiles import WsiTileDataset

__all__ = ["WsiTileDataset"]
