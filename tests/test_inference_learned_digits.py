"""The learned-schedule digits model of the schedule study as a prior: cached and reloaded by
``pretrained.load_learned_digits``, and run by every posterior method on a sub-grid.  The
model is the study's ``learned-shape`` configuration (network decoder discretized to the 17
levels) with a tiny network trained for a few steps, so that every test takes seconds."""

import math

import pytest
import torch

from pyro_diffusion.bound import bound
from pyro_diffusion.data import load_dataset
from pyro_diffusion.decoders import DiscretizedGaussian
from pyro_diffusion.inference import (
    DiffusionPrior,
    LinearObservation,
    dps_sample,
    nuts_conditional,
    replacement_sample,
    twisted_smc,
)
from pyro_diffusion.inference.pretrained import (
    learned_digits_paths,
    load_learned_digits,
    train_learned_digits,
)

K = 4  # the sub-grid every method runs on
TINY = {"hidden": 16, "depth": 1, "eval_times": 2, "eval_steps": (), "eval_every": 2, "val_times": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned_digits")
    torch.manual_seed(0)
    diffusion, results = train_learned_digits(steps=4, root=root, **TINY)
    return root, diffusion, results


@pytest.fixture(scope="module")
def problem():
    image = load_dataset("digits").test[0]
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[..., :4] = True
    observation = LinearObservation.mask(mask, noise_scale=0.1)
    y = observation.sample(image[None], generator=torch.Generator().manual_seed(0))[0]
    return observation, y


def _state(diffusion):
    return {k: v.detach().clone() for k, v in diffusion.state_dict().items()}


def test_the_model_is_the_studys_best_configuration_and_reloads_exactly(trained):
    root, diffusion, results = trained
    weights, config_path = learned_digits_paths(0, 4, root)
    assert weights.exists() and config_path.exists()
    loaded, config = load_learned_digits(steps=4, root=root, train_if_missing=False)
    assert config["config"] == "learned-shape" and config["recipe"] == "regularized"
    assert config["model"]["decoder"] == "network" and config["model"]["tuned"] == [-2.0, 4.0]
    assert config["settings"]["ema"] == 0.999 and config["settings"]["weight_decay"] == 1.0
    assert config["settings"]["val_size"] == 200 and config["results"]["best_step"] in (2, 4)
    assert loaded.decoder == "network" and loaded.num_levels == 17
    assert _state(loaded).keys() == _state(diffusion).keys()
    assert all(torch.equal(v, _state(diffusion)[k]) for k, v in _state(loaded).items())
    # the endpoints stayed frozen at the validation-chosen [−2, 4]
    low, high = loaded.schedule.endpoints()
    assert (low.item(), high.item()) == pytest.approx((-2.0, 4.0))
    # the study's test bound is reproduced by the reloaded weights with the study's draws
    torch.manual_seed(12345)
    value, se = bound(loaded, load_dataset("digits").test, num_steps=0, num_times=2).dataset_mean()
    assert value == pytest.approx(results["test_bpd_continuous"], rel=1e-6)
    assert se == pytest.approx(results["test_bpd_continuous_se"], rel=1e-6)


def test_a_missing_cache_is_refused_when_training_is_off(tmp_path):
    with pytest.raises(FileNotFoundError, match="root"):
        load_learned_digits(steps=4, root=tmp_path, train_if_missing=False)
    with pytest.raises(ValueError, match="steps"):
        train_learned_digits(steps=0, root=tmp_path)
    with pytest.raises(ValueError, match="seed"):
        train_learned_digits(seed=-1, root=tmp_path)


def test_the_prior_relaxes_the_discretized_decoder(trained):
    _, diffusion, _ = trained
    x_1 = torch.randn(3, 1, 8, 8)
    grid = DiffusionPrior(diffusion, num_steps=K).grid()
    assert isinstance(diffusion.decoder_distribution(x_1, grid[0]), DiscretizedGaussian)
    step = DiffusionPrior(diffusion, num_steps=K, decoder="gaussian").step_distribution(x_1, 1)
    assert isinstance(step.base_dist, torch.distributions.Normal)
    assert DiffusionPrior(diffusion, num_steps=K).network_calls_per_chain == K  # K − 1 steps + decoder


def _run(method, diffusion, observation, y):
    if method == "twisted_smc":
        return twisted_smc(diffusion, observation, y, num_particles=8, num_steps=K, seed=0)
    if method == "nuts":
        return nuts_conditional(
            diffusion,
            observation,
            y,
            num_samples=4,  # Pyro's MCMC diagnostics need 4 draws per chain
            warmup_steps=2,
            num_chains=2,
            num_steps=K,
            max_tree_depth=2,
            jit_compile=True,
            seed=0,
        )
    if method == "dps":
        return dps_sample(diffusion, observation, y, 3, step_size=0.3, num_steps=K)
    return replacement_sample(diffusion, observation, y, 3, num_steps=K)


@pytest.mark.parametrize("method", ["twisted_smc", "nuts", "dps", "replacement"])
def test_every_method_runs_on_a_subgrid_of_the_learned_model(trained, problem, method):
    _, diffusion, _ = trained
    observation, y = problem
    before = _state(diffusion)
    result = _run(method, diffusion, observation, y)
    assert result.method == method and result.num_steps == K
    assert result.draws.shape[1:] == (1, 8, 8) and torch.isfinite(result.draws).all()
    assert math.isfinite(result.seconds) and result.seconds > 0
    # the weights untouched and trainable again, no gradients left on them
    assert all(torch.equal(v, before[k]) for k, v in diffusion.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in diffusion.parameters())
    levels = torch.linspace(-1, 1, 17)
    on_levels = (result.draws[..., None] - levels).abs().min(-1).values < 1e-6
    if method == "twisted_smc":
        # one network call per level (the decoder uses the network); continuous x_0
        assert result.network_calls == K and result.diagnostics["ess"].shape == (K + 1,)
        assert not on_levels.all()
    elif method == "nuts":
        evaluations = result.diagnostics["potential_evaluations"]
        assert result.network_calls >= evaluations * K > 0 and result.num_chains == 2
        assert result.draws.shape[0] == 8 and not on_levels.all()
    else:
        assert result.network_calls == K and result.draws.shape[0] == 3
    if method == "replacement":  # the observed half is y itself
        torch.testing.assert_close(observation.mean(result.draws), y.expand(3, -1))
