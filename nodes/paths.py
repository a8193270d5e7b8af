"""The models/physmaster folder, registered with ComfyUI's folder_paths (so extra_model_paths.yaml works)."""

import os

import folder_paths

FOLDER = "physmaster"
EXTENSIONS = {".safetensors"}


def register() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    paths = list(entry[0]) if entry else []  # extra_model_paths.yaml may have registered paths already
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))


def save_dir() -> str:
    """Where PhysMasterEncoderSave writes: the first registered physmaster folder."""
    return folder_paths.get_folder_paths(FOLDER)[0]
