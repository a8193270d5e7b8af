"""Test-only: lets ComfyUI start on a host without torchvision (and torchaudio).

This directory is put on the PYTHONPATH of the ComfyUI server that the host tests start (never on a user's
install). Python imports ``sitecustomize`` at start-up; for each of torchvision/torchaudio that is not really installed, this installs
an import hook that serves ``torchvision`` / ``torchaudio`` and any submodule of them as a stub (see
``host_stubs.py``). Every stub object raises a clear RuntimeError when called, so ComfyUI modules that only
*import* torchvision load fine, and anything that really needs it fails loudly.

``importlib.util.find_spec("torchvision")`` still answers None, so libraries that probe for torchvision
(transformers' ``is_torchvision_available``, diffusers) keep treating it as absent. No package metadata
(dist-info) is created either.
"""

try:
    import host_stubs as _host_stubs

    _host_stubs.install()
except Exception as _exc:  # never break interpreter start-up because of a test helper
    import sys

    print(f"[physmaster host tests] torchvision/torchaudio stubs not installed: {_exc!r}", file=sys.stderr)
