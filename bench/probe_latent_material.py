"""How much of an object's material the video model's first-frame latent keeps: a small MLP probe trained on the
frame autoencoder's latents of 3000 seen drop start images, tested on 600 other seen and 600 unseen ones (chance
33%). The backbone reads the material from the 32-px image; this says how much of it the DiT could read without
the physical tokens. Side by side, on the same test images: how often the backbone's own restitution read-out is
nearest the true material's, which bounds what the tokens can add.

    python bench/probe_latent_material.py [--assets FILE]     # about 30 s on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    from physmaster.demo.assets import ASSET_FILE, load_assets
    from physmaster.demo.world import MATERIALS, drop_scene

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", type=Path, default=ASSET_FILE)
    args = ap.parse_args()
    vm, backbone, _ = load_assets(args.assets)
    names = list(MATERIALS)

    levels = torch.tensor([MATERIALS[n][1] for n in names])
    backbone_read = {}

    def data(base: int, n: int, split: str, tag: str):
        scenes = [drop_scene(base + i, split) for i in range(n)]
        x = vm.encode([s.frames[:1] for s in scenes])[:, :, 0]  # each start image as a 1-frame video
        y = torch.tensor([names.index(s.meta["texture"]) for s in scenes])
        read = backbone.read_restitution(torch.from_numpy(np.stack([s.frames[0] for s in scenes])))
        backbone_read[tag] = float((read == levels[y]).float().mean())
        return x.flatten(1), y

    train = data(7_000_000, 3000, "seen", "train")
    seen, unseen = data(8_000_000, 600, "seen", "seen"), data(9_000_000, 600, "unseen", "unseen")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    probe = torch.nn.Sequential(torch.nn.Linear(train[0].shape[1], 256), torch.nn.SiLU(), torch.nn.Linear(256, 3))
    opt = torch.optim.AdamW(probe.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(3000):
        idx = torch.randint(0, len(train[0]), (128,), generator=g)
        loss = torch.nn.functional.cross_entropy(probe(train[0][idx]), train[1][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = {name: float((probe(x).argmax(1) == y).float().mean()) for name, (x, y) in
               (("train", train), ("seen", seen), ("unseen", unseen))}
    print(f"material read from the first-frame latent (chance 33%): seen {acc['seen']:.0%}, unseen "
          f"{acc['unseen']:.0%} (train {acc['train']:.0%})")
    print(f"material read by the backbone (its restitution read-out, nearest material): seen "
          f"{backbone_read['seen']:.0%}, unseen {backbone_read['unseen']:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
