"""PhysMaster's ComfyUI nodes (V3). The only code of the pack that imports ComfyUI."""

from comfy_api.latest import ComfyExtension, io

from . import paths
from .encoder_nodes import (
    PhysMasterApply,
    PhysMasterEncode,
    PhysMasterEncoderLoader,
    PhysMasterEncoderNew,
    PhysMasterEncoderSave,
)

NODES: list[type[io.ComfyNode]] = [
    PhysMasterEncoderLoader,
    PhysMasterEncoderNew,
    PhysMasterEncoderSave,
    PhysMasterEncode,
    PhysMasterApply,
]


class PhysMasterExtension(ComfyExtension):
    async def on_load(self) -> None:
        paths.register()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


paths.register()
