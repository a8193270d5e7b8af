"""The demo's shipped weights: one safetensors file, one reader.

`demo_assets/proxy_world.safetensors` holds the frozen parts of the proxy world's tiny video stack: the frame
autoencoder (`ae.*`), the stand-in backbone (`backbone.*`) and the base DiT pretrained on generic motion
(`dit.*`). Its metadata `physmaster.demo_assets` records, for each part, the command that remakes it, the seed,
steps, wall time and final loss. `python -m physmaster demo --make-base` reproduces the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fileio import atomic_path
from .autoencoder import FrameAutoencoder
from .backbone import GeometryBackbone
from .generator import MODEL, VideoModel, new_dit

ASSETS = Path(__file__).resolve().parent.parent / "demo_assets"
ASSET_FILE = ASSETS / "proxy_world.safetensors"
META_KEY = "physmaster.demo_assets"
PARTS = {"ae": "autoencoder", "backbone": "backbone", "dit": "base DiT"}


def save_assets(path: Path, ae: FrameAutoencoder, backbone: GeometryBackbone, den, info: dict) -> Path:
    from safetensors.torch import save_file

    tensors = {}
    for prefix, module in (("ae", ae), ("backbone", backbone), ("dit", den.model)):
        for k, v in module.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().contiguous().clone()
    meta = {"format": "pt", META_KEY: json.dumps({**info, "dit_config": MODEL}, sort_keys=True, default=list)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_assets(path: Path = ASSET_FILE) -> tuple[VideoModel, GeometryBackbone, dict]:
    """The frozen autoencoder + base DiT (as a VideoModel), the backbone, and the file's records."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the demo's weights ship with the package; remake them with "
                              "`python -m physmaster demo --make-base`")
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get(META_KEY, "null"))
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CheckpointError(f"{path} is not a readable demo asset file ({e}); remake it with "
                              "`python -m physmaster demo --make-base`") from None
    if not isinstance(info, dict) or info.get("dit_config") != json.loads(json.dumps(MODEL, default=list)):
        raise CheckpointError(f"{path} was made for another demo model; remake it with "
                              "`python -m physmaster demo --make-base`")
    ae, backbone, den = FrameAutoencoder(), GeometryBackbone(), new_dit(0)
    for prefix, module in (("ae", ae), ("backbone", backbone), ("dit", den.model)):
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(part)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: the {PARTS[prefix]} weights do not fit this version ({e}); remake "
                                  "them with `python -m physmaster demo --make-base`") from None
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    guide = new_dit(0)  # the base again, frozen: what sampling is guided against (see VideoModel)
    guide.model.load_state_dict(den.model.state_dict())
    guide.model.eval().requires_grad_(False)
    return VideoModel(ae, den, guide), backbone, info


ASSET_STEPS = {"ae": 3000, "backbone": 1500, "dit": 5000}
ASSET_SEEDS = 1_000_000, 2_000_000, 3_000_000  # generic scenes, autoencoder drops, backbone drops


def make_assets(path: Path, seed: int = 0, fast: bool = False, log=print, plain_objects: bool = True) -> Path:
    """Remake the shipped weights: the frame autoencoder (on generic-motion and drop frames), the geometry
    backbone (on drop start images of both splits, *other* seeds than any demo scene), then the base DiT on
    generic motion in the autoencoder's latent space. `plain_objects` (the default, as the shipped file): the
    autoencoder learns to decode every object without its pattern, so the material is in no latent and the
    physical tokens are the video model's one way to the bounce, as the paper's DINOv2 sees what Wan's VAE latent
    does not spell out (bench/FINDINGS.md, "An autoencoder that draws every object plain"). False
    (`--patterned-objects`): the earlier autoencoder, which decodes each frame itself, pattern included."""
    import time

    import numpy as np

    from .autoencoder import train_autoencoder
    from .backbone import geometry_targets, train_backbone
    from .generator import pretrain_dit, pretraining_condition
    from .world import drop_scene, generic_scene, to_pixels

    steps = {k: (2 if fast else v) for k, v in ASSET_STEPS.items()}
    n_generic, n_drops, n_backbone = (8, 8, 16) if fast else (1500, 600, 6000)
    command = ("python -m physmaster demo --make-base" + (f" --seed {seed}" if seed else "")
               + ("" if plain_objects else " --patterned-objects"))
    info: dict = {"command": command, "seed": seed}
    t0 = time.perf_counter()
    log(f"rendering {n_generic} generic-motion scenes and {n_drops} drops")
    generic = [generic_scene(ASSET_SEEDS[0] + i) for i in range(n_generic)]
    drops = [drop_scene(ASSET_SEEDS[1] + i, "seen" if i % 2 else "unseen") for i in range(n_drops)]
    frames = torch.cat([to_pixels(s.frames) for s in generic + drops])
    masks = torch.cat([torch.from_numpy(s.object_masks()) for s in generic + drops])
    targets = None
    if plain_objects:  # the same scenes with every object drawn without its pattern, as the decoder's targets
        plain = [generic_scene(ASSET_SEEDS[0] + i, plain=True) for i in range(n_generic)]
        plain += [drop_scene(ASSET_SEEDS[1] + i, "seen" if i % 2 else "unseen", plain=True) for i in range(n_drops)]
        targets = torch.cat([to_pixels(s.frames) for s in plain])
    log(f"[1/3] frame autoencoder: {steps['ae']} steps on {len(frames)} frames"
        + (" (objects decoded plain)" if plain_objects else ""))
    ae, info["ae"] = train_autoencoder(frames, masks, steps["ae"], seed=seed, log=log, targets=targets)
    if plain_objects:
        info["ae"]["decodes"] = "every object plain (its material's pattern drawn flat)"
    log(f"[2/3] geometry backbone: {steps['backbone']} steps on {n_backbone} start images")
    scenes = [drop_scene(ASSET_SEEDS[2] + i, "seen" if i % 2 else "unseen") for i in range(n_backbone)]
    images = torch.from_numpy(np.stack([s.frames[0] for s in scenes]))
    targets = torch.from_numpy(np.stack([geometry_targets(s) for s in scenes]))
    backbone, info["backbone"] = train_backbone(images, targets, steps["backbone"], seed=seed, log=log)
    log(f"[3/3] base DiT: {steps['dit']} steps of flow matching on {n_generic} generic-motion videos")
    lat = VideoModel(ae, None).encode([s.frames for s in generic])
    den, info["dit"] = pretrain_dit(lat, pretraining_condition(lat), steps["dit"], seed=seed, log=log)
    for part in ("ae", "backbone", "dit"):
        info[part]["command"] = command
        info[part]["seed"] = seed
    info["seconds"] = time.perf_counter() - t0
    save_assets(path, ae, backbone, den, info)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {info['seconds']:.0f}s")
    return path
