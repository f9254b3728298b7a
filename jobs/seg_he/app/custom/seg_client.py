"""NVFlare client script of the segmentation jobs (runs at every site)."""

from fedimaging_app.client_loop import custom_folder, run
from fedimaging_app.seg_engine import SegmentationEngine

if __name__ == "__main__":
    run(SegmentationEngine, custom_folder())
