"""Socket types of this pack (public API: never rename)."""

from comfy_api.latest import io

PhysEncoderType = io.Custom("PHYSMASTER_ENCODER")
PhysTokensType = io.Custom("PHYSMASTER_TOKENS")

CATEGORY = "PhysMaster"
