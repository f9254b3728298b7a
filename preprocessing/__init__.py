"""Site-side preparation of DICOM series and research volumes into training-ready data.

This package never imports NVFlare: it runs at a site before any federation exists.
"""

__version__ = "0.1.0"
