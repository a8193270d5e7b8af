"""`python -m physmaster demo`: the whole PhysMaster pipeline on the drop proxy world, on a CPU, in minutes.

One concern per module, so the generator or the backbone can be swapped without reading the rest:

- `world`       the proxy world the demo renders (size, frames, the material law, drops vs generic motion)
- `autoencoder` the per-frame latent autoencoder under the video model (as Wan's VAE under Wan's DiT)
- `backbone`    the frozen stand-in for DINOv2: a CNN pretrained to read geometry and material
- `generator`   the tiny Wan DiT over the latents, its conditioning and sampling; base pretraining
- `assets`      the shipped weights file (one reader) and `--make-base`, which remakes it
- `pipeline`    Stage I, on-policy candidates and their labels, Flow-DPO stages
- `evaluation`  PISA metrics, coherence, paired bootstrap intervals
- `judging`     the physics judge as labeller: judge-labelled pairs and their agreement with the ground truth
- `report`      the table, the GIF, results.json
- `cli`         the command: rows in the paper's order, seeds, eval seeds
"""

from .cli import HELP, add_arguments, run
from .evaluation import bootstrap_ci
from .report import format_table

__all__ = ["HELP", "add_arguments", "bootstrap_ci", "format_table", "run"]
