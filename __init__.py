"""PhysMaster for ComfyUI: the pack's entry point (V3).

ComfyUI imports this folder as a package and calls `comfy_entrypoint()`. Nothing here imports ComfyUI at import
time, so the core library `physmaster/` can be imported and tested without it.
"""

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]


async def comfy_entrypoint():
    from .nodes import PhysMasterExtension

    return PhysMasterExtension()
