"""fedimaging: federated training of medical imaging and pathology models on NVIDIA FLARE."""

from preprocessing import __version__

__all__ = ["__version__"]
