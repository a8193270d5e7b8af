"""PhysMaster core: physical tokens for image-to-video diffusion models.

Host-independent (never imports ComfyUI). See shared/DESIGN.md for the architecture.
"""

__version__ = "0.1.0"
