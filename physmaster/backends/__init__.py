"""Denoiser implementations for standalone (non-ComfyUI) use. Import the submodule you need
(`physmaster.backends.diffusers_wan`); importing this package imports no model library."""
