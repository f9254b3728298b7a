"""Deterministic synthetic data for the demo federation: CT series with label maps, and H&E slides.

The files look like site exports (DICOM series, NIfTI label maps, pyramidal TIFF slides, QuPath
GeoJSON annotations), so the demo runs the real ``prepare dicom`` and ``prepare wsi`` steps on them.
All identifiers are made up, and the same arguments always produce byte-identical files.
"""

from fedimaging.demo.pathology import generate_pathology_site
from fedimaging.demo.radiology import generate_radiology_site

__all__ = ["generate_pathology_site", "generate_radiology_site"]
