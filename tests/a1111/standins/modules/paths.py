"""modules.paths: models_path is the webui's models/ folder; extensions keep their files in a
sub-folder of it (a1111.md "Extension layout": the refiner folder defaults to models/dice_refiners,
overridable by a preload.py flag)."""
import os
import tempfile

models_path = os.path.join(tempfile.gettempdir(), "cfg-distill-standin-webui", "models")
