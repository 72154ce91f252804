"""Training with SVI on 2-D data: the bound against the true entropy, sample quality, and a plain
PyTorch loop over the ELBOModule."""

import copy
import math

import pyro
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import ClippedAdam

from _helpers import energy_distance
from pyro_diffusion import DiffusionELBO, GaussianDiffusion, MLPDenoiser, NoiseSchedule
from pyro_diffusion.data import GaussianMixture2D
from pyro_diffusion.training import elbo_module

T = 50
STEPS = 2000
BATCH = 256
MARGIN_NATS = 0.35  # stated margin: the trained bound is within 0.35 nats of the entropy


def new_diffusion(seed=0, hidden=128, depth=3):
    torch.manual_seed(seed)
    return GaussianDiffusion(MLPDenoiser(2, hidden=hidden, depth=depth), NoiseSchedule.linear(T), (2,))


@pytest.fixture(scope="module")
def trained():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    mixture = GaussianMixture2D()
    diffusion = new_diffusion()
    untrained = copy.deepcopy(diffusion)
    optim = ClippedAdam({"lr": 2e-3, "lrd": 0.01 ** (1 / STEPS), "clip_norm": 10.0})
    svi = SVI(diffusion.model, diffusion.guide, optim, DiffusionELBO())
    g = torch.Generator().manual_seed(1)
    losses = [svi.step(mixture.sample(BATCH, g)) / BATCH for _ in range(STEPS)]
    pyro.clear_param_store()
    return {"mixture": mixture, "diffusion": diffusion, "untrained": untrained, "losses": losses}


def test_training_reduces_the_loss(trained):
    losses = torch.tensor(trained["losses"])
    # the loss falls within tens of steps; the one-step estimate is noisy (the decoder, at
    # σ_1² = 1e-4, is one of its steps with weight T), so compare means with their errors
    first, last = losses[:10], losses[-200:]
    assert last.mean() < first.mean() - 4 * math.hypot(first.std() / 10**0.5, last.std() / 200**0.5)
    assert last.mean() < 4.0  # nats per datum; the untrained start is far above
    # and the whole bound (every step's term) on fresh data fell
    fresh = trained["mixture"].sample(2000, torch.Generator().manual_seed(3))
    before = trained["untrained"].vlb_terms(fresh).sum(1).mean().item()
    after = trained["diffusion"].vlb_terms(fresh).sum(1).mean().item()
    assert after < before - 1.0, (before, after)


def test_bound_on_fresh_data_is_above_the_entropy_and_close_to_it(trained):
    mixture, diffusion = trained["mixture"], trained["diffusion"]
    entropy, entropy_se = mixture.entropy(num_samples=200_000)
    g = torch.Generator().manual_seed(7)
    fresh = mixture.sample(4000, g)
    nll = diffusion.vlb_terms(fresh).sum(1).double()
    mean, se = nll.mean().item(), (nll.std() / math.sqrt(nll.numel())).item()
    print(f"bound {mean:.4f} ± {se:.4f} nats, entropy {entropy:.4f} ± {entropy_se:.4f}")
    # −ELBO ≥ −log p_θ(x) and E_p[−log p_θ] ≥ H(p): never below the entropy beyond sampling error
    assert mean > entropy - 4 * math.hypot(se, entropy_se), (mean, se, entropy)
    assert mean < entropy + MARGIN_NATS, (mean, se, entropy)


def test_samples_match_held_out_data_and_a_broken_model_fails(trained):
    mixture, diffusion = trained["mixture"], trained["diffusion"]
    g = torch.Generator().manual_seed(11)
    held_out = mixture.sample(1500, g)
    reference = energy_distance(mixture.sample(1500, g), held_out)  # two samples of the data itself
    threshold = 0.02
    torch.manual_seed(3)
    good = energy_distance(diffusion.sample(1500), held_out)
    broken = energy_distance(trained["untrained"].sample(1500), held_out)
    print(f"energy distance: data/data {reference:.4f}, model {good:.4f}, untrained {broken:.4f}")
    assert reference < threshold
    assert good < threshold, good
    assert broken > 5 * threshold, broken


def test_plain_pytorch_loop_over_the_elbo_module_trains_as_well_as_svi():
    """Same network, initialization, batches, step draws and Adam settings: SVI with
    pyro.optim.Adam against a torch.optim.Adam loop over the ELBOModule of DiffusionELBO()
    (``elbo_module``, which runs the programs with module-local parameters)."""
    steps, lr = 300, 2e-3
    mixture = GaussianMixture2D()
    base = new_diffusion(seed=5, hidden=64, depth=2)
    svi_diffusion, loop_diffusion = copy.deepcopy(base), copy.deepcopy(base)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(2)
    svi = SVI(svi_diffusion.model, svi_diffusion.guide, pyro.optim.Adam({"lr": lr}), DiffusionELBO())
    svi_losses = [svi.step(mixture.sample(BATCH, g)) / BATCH for _ in range(steps)]

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(2)
    module = elbo_module(loop_diffusion, DiffusionELBO())
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    loop_losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = module(mixture.sample(BATCH, g))
        loss.backward()
        optimizer.step()
        loop_losses.append(loss.item() / BATCH)
    assert len(pyro.get_param_store()) == 0  # nothing entered the global param store

    # both trained: the last 50 losses are far below the first 50
    for losses in (svi_losses, loop_losses):
        assert sum(losses[-50:]) < 0.5 * sum(losses[:50])
    # the same bound on held-out data within noise (common random numbers for the evaluation)
    held_out = mixture.sample(3000, torch.Generator().manual_seed(9))
    pyro.set_rng_seed(4)
    a = svi_diffusion.vlb_terms(held_out).sum(1).double()
    pyro.set_rng_seed(4)
    b = loop_diffusion.vlb_terms(held_out).sum(1).double()
    difference = a - b
    se = difference.std() / math.sqrt(difference.numel())
    print(f"held-out bound: SVI {a.mean():.4f}, plain loop {b.mean():.4f}, paired SE {se:.2e}")
    assert abs(difference.mean()) < 4 * se + 1e-6, (a.mean(), b.mean(), se)
