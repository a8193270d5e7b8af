"""Flow-DPO's own figure on pairs a head did not train on: does what the head learned from its preferences hold
on other start images?

A Flow-DPO stage raises each training pair's *implicit reward margin*, the quantity inside its loss,

    m = -beta/2 * [(err_w(policy) - err_w(ref)) - (err_l(policy) - err_l(ref))],

where err is the flow-matching error on the winner / loser noised with the same t and noise. On the training
pairs m > 0 only says the stage fit them. On *held-out* pairs (other start images, labelled the same way) m > 0
says the head learned a preference that generalises; m near 0 says it memorised its pairs. `preference_margins`
gives each pair's m averaged over `draws` draws of (t, noise), the same draws for every head measured, so two heads
(true labels against placebo labels, say) are compared on the same noise.
"""

from __future__ import annotations

import torch

from ..losses import flow_dpo_from_errors, per_sample_sq_error
from .data import PreferenceSet
from .denoiser import Denoiser
from .stages import TrainConfig, noised_pairs, sample_t


@torch.no_grad()
def preference_margins(denoiser: Denoiser, pairs: PreferenceSet, head: torch.nn.Module,
                       ref_head: torch.nn.Module, beta: float, draws: int = 16, seed: int = 0, batch: int = 64,
                       config: TrainConfig | None = None) -> torch.Tensor:
    """Each pair's Flow-DPO implicit reward margin [N] of the model with `head`'s physical tokens against the same
    model with `ref_head`'s (a Stage III head against the head it started from), averaged over `draws` draws of
    (t, noise) seeded by `seed`. `config` gives the t sampling and token strength (the stage's; default: a
    TrainConfig's). The denoiser is left as it is (its LoRA, if any, counts for both)."""
    if draws < 1 or batch < 1:
        raise ValueError(f"draws and batch must be >= 1, got {draws} and {batch}")
    cfg = config if config is not None else TrainConfig(steps=1, lr=1.0)
    n = len(pairs)
    batches = [(s, pairs.batch(range(s, min(s + batch, n)))) for s in range(0, n, batch)]  # stacked once
    out = torch.zeros(n, dtype=torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(draws):
        t_all = sample_t(cfg, n, gen)
        noise_all = torch.randn((n, *pairs.latent_shape), generator=gen)
        for s, (xw, xl, cond) in batches:
            b = xw.shape[0]
            x_t, t, target, cond2 = noised_pairs(denoiser, xw, xl, cond, t_all[s:s + b], noise_all[s:s + b])

            def errors(h):
                c = cond2.with_tokens(h(cond2.features), cfg.token_strength)
                return per_sample_sq_error(denoiser.predict_velocity(x_t, t, c).float(), target.float())

            err, ref = errors(head), errors(ref_head)
            dpo = flow_dpo_from_errors(err[:b], err[b:], ref[:b], ref[b:], beta)
            out[s:s + b] += dpo.per_pair_margin.double().cpu()
    return (out / draws).float()


def margin_summary(margins: torch.Tensor) -> dict[str, float]:
    """Accuracy (share of pairs with margin > 0), mean margin and its standard error."""
    m = margins.double()
    n = m.numel()
    se = float(m.std() / n ** 0.5) if n > 1 else float("nan")
    return {"pairs": n, "accuracy": float((m > 0).double().mean()), "margin": float(m.mean()), "se": se}
