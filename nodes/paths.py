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


def unique_save_path(folder_name: str, filename_prefix: str, suffix: str = ".safetensors") -> tuple[str, str]:
    """(full path in the first folder of `folder_name`, name relative to it) for `<prefix>_NNNNN_<suffix>`, with
    a counter that no registered folder of that kind already uses for that name.

    ComfyUI's loaders look a relative name up in every registered folder, first match wins; a file in the first
    folder with a name that exists in another would shadow the older file for every workflow that names it."""
    roots = folder_paths.get_folder_paths(folder_name)
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, roots[0])

    def taken(n: int) -> bool:
        rel = os.path.join(subfolder, f"{name}_{n:05}_{suffix}") if subfolder else f"{name}_{n:05}_{suffix}"
        return any(os.path.lexists(os.path.join(root, rel)) for root in roots)

    for root in roots[1:]:  # start above every counter in use in any folder, so names keep their order
        other = os.path.join(root, subfolder) if subfolder else root
        try:
            entries = os.listdir(other)
        except OSError:
            continue
        for entry in entries:
            if entry.startswith(f"{name}_") and entry.endswith(f"_{suffix}"):
                digits = entry[len(name) + 1:-len(suffix) - 1]
                if digits.isdigit():
                    counter = max(counter, int(digits) + 1)
    while taken(counter):
        counter += 1
    filename = f"{name}_{counter:05}_{suffix}"
    return os.path.join(folder, filename), (os.path.join(subfolder, filename) if subfolder else filename)
