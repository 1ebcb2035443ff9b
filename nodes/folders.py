"""The `dice_refiners` model folder: models/dice_refiners plus the pack's bundled weights/.

Registered through folder_paths, so an `extra_model_paths.yaml` key `dice_refiners:` adds folders
too (the webui extension can be pointed at the same folder). Files are only ever opened through
folder_paths look-ups of listed names: no client-supplied path reaches the file system."""
import os

import folder_paths

from ..cfg_distill.refiner_file import listed_refiner

FOLDER = "dice_refiners"
BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


def register() -> None:
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    folder_paths.add_model_folder_path(FOLDER, BUNDLED)
    # Only safetensors are offered: pickles are never loaded (convert them with import-official).
    folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")


def refiner_names() -> list[str]:
    return [n for n in folder_paths.get_filename_list(FOLDER) if listed_refiner(n)]


def refiner_path(name: str) -> str:
    """Full path of a listed refiner; raises if the name is not a file in a registered folder."""
    if name not in refiner_names():
        raise FileNotFoundError(
            f"DICE refiner {name!r} is not in the dice_refiners folders "
            f"({', '.join(folder_paths.get_folder_paths(FOLDER))}). Put .safetensors refiners there "
            "and press R in the UI to refresh.")
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def default_dir() -> str:
    """Where trained refiners are saved: the first registered folder (models/dice_refiners)."""
    path = folder_paths.get_folder_paths(FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path
