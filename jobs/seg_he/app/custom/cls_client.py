"""NVFlare client script of the tile classification jobs (runs at every site)."""

from fedimaging_app.client_loop import custom_folder, run
from fedimaging_app.cls_engine import ClassificationEngine

if __name__ == "__main__":
    run(ClassificationEngine, custom_folder())
