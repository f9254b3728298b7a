"""Code that fedimaging's NVFlare jobs ship to sites: configuration, data, models, training and validation.

This package must stay importable inside a job's ``custom/`` folder: it imports torch, MONAI, numpy,
PyYAML and pydantic (and OpenSlide for slide tiles), never the rest of the fedimaging project.
"""

__version__ = "0.1.0"
