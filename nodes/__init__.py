"""PhysMaster's ComfyUI nodes (V3). The only code of the pack that imports ComfyUI."""

from comfy_api.latest import ComfyExtension, io

from . import paths, routes
from .dataset_nodes import PhysMasterSaveTrainingVideos
from .encoder_nodes import (
    PhysMasterApply,
    PhysMasterEncode,
    PhysMasterEncoderLoader,
    PhysMasterEncoderNew,
    PhysMasterEncoderSave,
)
from .physics_nodes import PhysMasterDropScene, PhysMasterPhysicsScore
from .preference_nodes import PhysMasterPreferenceDataset, PhysMasterPreferencePicker, PhysMasterPreferenceReview
from .training_nodes import PhysMasterTrainDPO, PhysMasterTrainSFT

NODES: list[type[io.ComfyNode]] = [
    PhysMasterEncoderLoader,
    PhysMasterEncoderNew,
    PhysMasterEncoderSave,
    PhysMasterEncode,
    PhysMasterApply,
    PhysMasterDropScene,
    PhysMasterPhysicsScore,
    PhysMasterPreferencePicker,
    PhysMasterPreferenceDataset,
    PhysMasterTrainSFT,
    PhysMasterTrainDPO,
    PhysMasterSaveTrainingVideos,
    PhysMasterPreferenceReview,
]


class PhysMasterExtension(ComfyExtension):
    async def on_load(self) -> None:
        paths.register()
        routes.register()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


paths.register()
routes.register()
