"""Whole-slide image preparation: resolution, tissue detection, tile grids, labels, tile loading."""
