"""Several runs as ArviZ chains, and a user's own MCMC run on a model holding the prior."""

import math
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from inference_helpers import linear_diffusion
from pyro import poutine
from pyro.infer import MCMC, NUTS

from pyro_diffusion.inference import DiffusionPrior
from pyro_diffusion.inference import arviz as pd_arviz
from pyro_diffusion.inference.result import PosteriorResult


def _smc_result(center, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    particles = center + 0.1 * torch.randn(n, 2, generator=g)
    log_weights = torch.log_softmax(torch.randn(n, generator=g), 0)
    return PosteriorResult(
        draws=particles,
        log_weights=log_weights,
        diagnostics={
            "ess": torch.linspace(n, n / 2, 6),
            "resampled": torch.zeros(6, dtype=torch.bool),
            "log_evidence": -float(seed),
        },
        seconds=0.5,
        network_calls=5,
        method="twisted_smc",
        num_steps=5,
    )


def _svi_result(loc, steps=7, seed=0):
    loc = torch.tensor(loc)

    def sampler(n, generator=None):
        return loc + 0.2 * torch.randn((n, 2), generator=generator)

    return PosteriorResult(
        draws=sampler(50),
        diagnostics={"losses": [float(seed + i) for i in range(steps)], "loc": loc},
        method="svi",
        num_steps=5,
        sampler=sampler,
    )


def test_from_runs_makes_one_chain_per_smc_run_and_r_hat_sees_disagreement():
    agree = [_smc_result(torch.tensor([1.0, 0.0]), seed=r) for r in range(4)]
    idata = pd_arviz.from_runs(agree, num_draws=300)
    assert idata.posterior["x0"].shape == (4, 300, 2)
    diag = idata.smc_diagnostics
    assert diag["particles"].shape == (4, 400, 2) and diag["log_weight"].shape == (4, 400)
    np.testing.assert_array_equal(diag["log_evidence"].values, [0.0, -1.0, -2.0, -3.0])
    assert idata.posterior.attrs["num_runs"] == 4 and idata.posterior.attrs["network_calls"] == 20
    # every draw is one of its own run's particles
    for r, result in enumerate(agree):
        particles = result.draws.numpy()
        draws = idata.posterior["x0"].values[r]
        assert np.isin(draws[:, 0], particles[:, 0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shape warning with four chains
        summary = az.summary(idata)
    assert (summary["r_hat"] < 1.05).all()
    # one run stuck elsewhere: R-hat flags it
    disagree = agree[:3] + [_smc_result(torch.tensor([-1.0, 0.0]), seed=3)]
    assert (az.summary(pd_arviz.from_smc(disagree, num_draws=300))["r_hat"] > 1.5).any()


def test_from_svi_and_from_result_take_lists_with_a_chain_dimension_on_the_loss():
    fits = [_svi_result([0.5, 0.5], seed=r) for r in range(3)]
    idata = pd_arviz.from_svi(fits, num_draws=40)
    assert idata.posterior["x0"].shape == (3, 40, 2)
    np.testing.assert_array_equal(idata.loss["loss"].values[:, 0], [0.0, 1.0, 2.0])
    assert pd_arviz.from_result(fits, num_draws=40).loss["loss"].shape == (3, 7)


def test_from_runs_refuses_mixed_or_unequal_runs():
    smc = _smc_result(torch.zeros(2))
    with pytest.raises(ValueError, match="results: expected results of one method"):
        pd_arviz.from_runs([smc, _svi_result([0.0, 0.0])])
    with pytest.raises(ValueError, match="results"):
        pd_arviz.from_runs([])
    with pytest.raises(TypeError, match=r"results\[1\]"):
        pd_arviz.from_runs([smc, "not a result"])
    with pytest.raises(ValueError, match="different numbers of steps"):
        pd_arviz.from_runs([_svi_result([0.0, 0.0]), _svi_result([0.0, 0.0], steps=3)])
    heuristic = [PosteriorResult(draws=torch.randn(n, 2), method="dps") for n in (10, 12)]
    with pytest.raises(ValueError, match="draws per chain"):
        pd_arviz.from_runs(heuristic)
    assert pd_arviz.from_runs(heuristic, num_draws=10).posterior["x0"].shape == (2, 10, 2)
    with pytest.raises(ValueError, match="num_draws"):
        pd_arviz.from_runs(heuristic, num_draws=11)


def test_independent_runs_seeds_each_run():
    seen = []

    def seeded(a, *, seed, scale=1.0):
        seen.append(seed)
        g = torch.Generator().manual_seed(seed)
        return PosteriorResult(draws=scale * torch.randn(5, 2, generator=g) + a, method="dps")

    runs = pd_arviz.independent_runs(seeded, 1.0, num_runs=3, seed=10, scale=2.0)
    assert seen == [10, 11, 12] and len(runs) == 3

    def unseeded():
        return PosteriorResult(draws=torch.randn(5, 2), method="dps")

    first = pd_arviz.independent_runs(unseeded, num_runs=2, seed=3)
    again = pd_arviz.independent_runs(unseeded, num_runs=2, seed=3)
    assert torch.equal(first[1].draws, again[1].draws) and not torch.equal(first[0].draws, first[1].draws)
    with pytest.raises(ValueError, match="num_runs"):
        pd_arviz.independent_runs(unseeded, num_runs=0)
    with pytest.raises(TypeError, match="method"):
        pd_arviz.independent_runs(lambda: "nothing", num_runs=1)


# ---------------------------------------------------------------------- from_pyro
def _models(prior):
    def vectorizes(y):
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("points", y.shape[0]):
            x = prior("x")
            pyro.sample("y", dist.Normal(x, sigma[..., None]).to_event(1), obs=y)

    def broadcasts_badly(y):  # right for one draw, wrong against a leading sample dimension
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("points", y.shape[0]):
            x = prior("x")
            pyro.sample("y", dist.Normal(x, sigma).to_event(1), obs=y)

    return vectorizes, broadcasts_badly


def _run(model, y, seed=0, chains=1):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(
        NUTS(model, max_tree_depth=3), num_samples=8, warmup_steps=8, num_chains=chains, disable_progbar=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc.run(y)
    return mcmc


def _log_lik_at(model, mcmc, y, index):
    draw = {k: v[index] for k, v in mcmc.get_samples().items()}
    trace = poutine.trace(poutine.condition(model, data=draw)).get_trace(y)
    return trace.nodes["y"]["fn"].log_prob(y), trace.nodes["x/x_0"]["value"]


@pytest.mark.parametrize("which", ["vectorizes", "broadcasts_badly"])
def test_from_pyro_gives_x0_and_the_log_likelihood_of_a_non_centred_user_model(which):
    prior = DiffusionPrior(linear_diffusion())
    model = dict(zip(["vectorizes", "broadcasts_badly"], _models(prior)))[which]
    noncentred = poutine.reparam(model, config=prior.reparam_config("x"))
    y = torch.tensor([[0.5, -0.2], [1.0, 0.3], [-0.4, 0.1]])
    mcmc = _run(noncentred, y)
    idata = pd_arviz.from_pyro(mcmc, (y,))
    expected = "vectorized" if which == "vectorizes" else "sequential"
    assert idata.posterior.attrs["log_likelihood_evaluation"] == expected
    assert set(idata.posterior.data_vars) == {"sigma", "x0"}
    assert idata.posterior["x0"].shape == (1, 8, 3, 2)
    assert idata.log_likelihood["y"].shape == (1, 8, 3) and list(idata.observed_data.data_vars) == ["y"]
    for index in (0, 5):
        log_lik, x0 = _log_lik_at(noncentred, mcmc, y, index)
        np.testing.assert_allclose(idata.log_likelihood["y"].values[0, index], log_lik.numpy(), rtol=1e-5)
        np.testing.assert_allclose(idata.posterior["x0"].values[0, index], x0.numpy(), rtol=1e-5)
    # x_0 from the non-centred noises by the chain itself
    samples = mcmc.get_samples()
    K = prior.num_steps
    noise = {K - i: samples[n] for i, n in enumerate(prior.decentered_site_names("x"))}
    np.testing.assert_allclose(
        idata.posterior["x0"].values[0], prior.chain_from_noise(noise).numpy(), rtol=1e-4, atol=1e-6
    )
    everything = pd_arviz.from_pyro(mcmc, (y,), include_chain=True)
    assert set(prior.decentered_site_names("x")) | set(prior.site_names("x")) <= set(
        everything.posterior.data_vars
    )
    if which == "vectorizes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # WAIC's own caution on 8 draws
            assert math.isfinite(float(az.waic(idata).elpd_waic))


def test_arviz_from_pyro_is_what_from_pyro_fixes():
    """ArviZ's own converter drops the likelihood of the badly broadcasting model and lists the
    reparameterized sites as data; from_pyro does neither."""
    prior = DiffusionPrior(linear_diffusion())
    vectorizes, broadcasts_badly = _models(prior)
    y = torch.tensor([[0.5, -0.2], [1.0, 0.3], [-0.4, 0.1]])
    with pytest.warns(UserWarning, match="Could not get vectorized trace"):
        bad = az.from_pyro(_run(broadcasts_badly, y))
    assert "log_likelihood" not in bad.groups()
    reparam = az.from_pyro(_run(poutine.reparam(vectorizes, config=prior.reparam_config("x")), y))
    assert "x/x_0" in reparam.observed_data and "x0" not in reparam.posterior


def test_from_pyro_stacks_runs_as_chains_and_checks_its_arguments():
    prior = DiffusionPrior(linear_diffusion())
    vectorizes, _ = _models(prior)
    y = torch.tensor([[0.5, -0.2], [1.0, 0.3]])
    runs = [_run(vectorizes, y, seed=s) for s in (0, 1)]
    idata = pd_arviz.from_pyro(runs, (y,))
    assert idata.posterior["x0"].shape == (2, 8, 2, 2) and idata.sample_stats["diverging"].shape == (2, 8)
    assert idata.posterior.attrs["log_likelihood_evaluation"] == "vectorized"  # the centred chain too
    np.testing.assert_array_equal(
        idata.posterior["sigma"].values, np.stack([r.get_samples()["sigma"].numpy() for r in runs])
    )
    with pytest.raises(TypeError, match=r"mcmc\[1\]"):
        pd_arviz.from_pyro([runs[0], "a run"], (y,))
    with pytest.raises(TypeError, match="model_args"):
        pd_arviz.from_pyro(runs[0], y)
    with pytest.raises(ValueError, match="mcmc"):
        pd_arviz.from_pyro([], (y,))
