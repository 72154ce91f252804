"""Every posterior method on any Diffusion and any grid: a continuous-time model with a learned
schedule (the exact denoiser of Gaussian data, so its chain on any K-level grid is
linear-Gaussian and p_θ(x_0 | y), p_θ(y) and SVI's mean-field optimum are known exactly),
and a T = 100 DDPM run on a respaced 10-level sub-grid."""

import math

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from inference_helpers import (
    exact_conditional,
    gaussian_ddpm,
    learned_gaussian_diffusion,
    linear_chain_marginal,
    mean_field_optimum,
)
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_diffusion.chains import site_name
from pyro_diffusion.inference import (
    DiffusionPrior,
    LinearObservation,
    chain_guide,
    dps_sample,
    nuts_conditional,
    replacement_sample,
    svi_conditional,
    twisted_smc,
)
from pyro_diffusion.inference import arviz as pd_arviz

OBSERVATION = LinearObservation(torch.tensor([[1.0, 0.5]]), (2,), noise_scale=0.3)
Y = torch.tensor([0.8])
K = 10  # the grid every method runs on

CASES = {
    # name: (constructor, num_steps given to the methods)
    "learned-plain": (lambda: learned_gaussian_diffusion("plain"), K),
    "learned-network": (lambda: learned_gaussian_diffusion("network"), K),
    "ddpm100-subgrid": (lambda: gaussian_ddpm(100), K),
}


def _state(diffusion):
    return {k: v.detach().clone() for k, v in diffusion.state_dict().items()}


def _unchanged(diffusion, before):
    """The weights (the learned schedule's included) untouched, trainable again, no gradients."""
    assert all(torch.equal(before[k], v) for k, v in diffusion.state_dict().items())
    assert all(p.requires_grad for p in diffusion.parameters())
    assert all(p.grad is None for p in diffusion.parameters())


# ---------------------------------------------------------------------------- the grids
def test_the_ddpm_subgrid_is_a_respacing_of_its_own_steps():
    diffusion = gaussian_ddpm(100)
    prior = DiffusionPrior(diffusion, num_steps=K)
    steps = diffusion.schedule.subgrid_steps(K)
    assert steps[0] == 1 and steps[-1] == 100
    torch.testing.assert_close(prior.grid(), diffusion.schedule.gammas[steps - 1])
    assert prior.num_steps == K and prior.site_names("x") == [f"x/x_{k}" for k in range(K, -1, -1)]
    assert DiffusionPrior(diffusion).num_steps == 100


def test_the_learned_schedule_prior_runs_on_any_grid_with_its_sites_renumbered():
    diffusion = learned_gaussian_diffusion()
    assert diffusion.schedule.is_learned
    for num_steps in (3, K):
        prior = DiffusionPrior(diffusion, num_steps=num_steps)
        trace = poutine.trace(prior).get_trace("x")
        sites = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
        assert sites == prior.site_names("x") and sites[0] == f"x/x_{num_steps}"
        # the grid runs from γ(0) to γ(1) of the learned schedule, and does not carry its graph
        grid = prior.grid()
        low, high = diffusion.schedule.endpoints()
        assert not grid.requires_grad
        torch.testing.assert_close(grid[[0, -1]], torch.stack([low, high]).detach())


@pytest.mark.parametrize("case", list(CASES))
def test_prior_draws_match_the_exact_marginal_on_the_grid(case):
    """Mean and variance of 4000 prior draws within 4 standard errors of the exact Gaussian
    p_θ(x_0) of the K-level chain."""
    make, num_steps = CASES[case]
    diffusion = make()
    prior = DiffusionPrior(diffusion, num_steps=num_steps)
    n = 4000
    with torch.no_grad(), pyro.plate("draws", n):
        draws = prior("x").to(torch.float64)
    mean, cov = linear_chain_marginal(diffusion, num_steps)
    assert ((draws.mean(0) - mean).abs() < 4 * (cov.diagonal() / n).sqrt()).all()
    var_se = cov.diagonal() * (2 / (n - 1)) ** 0.5
    assert ((draws.var(0) - cov.diagonal()).abs() < 4 * var_se).all()


def test_a_learned_schedule_stays_frozen_under_the_users_svi_and_trains_when_fine_tuned():
    def user_model(prior, y):
        with pyro.plate("items", y.shape[0]):
            x = prior("x")
            pyro.sample("y", dist.Normal(x, 0.3).to_event(1), obs=y)

    y = torch.randn(3, 2)
    diffusion = learned_gaussian_diffusion("network")
    before = _state(diffusion)
    prior = DiffusionPrior(diffusion, num_steps=K)
    guide = AutoNormal(lambda y: user_model(prior, y))
    svi = SVI(lambda y: user_model(prior, y), guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(y)
    _unchanged(diffusion, before)
    assert not any(n.startswith(diffusion.name) for n in pyro.get_param_store().keys())

    pyro.clear_param_store()
    tuned = DiffusionPrior(diffusion, num_steps=K, fine_tune=True, module_name="tuned")
    guide = AutoNormal(lambda y: user_model(tuned, y))
    svi = SVI(lambda y: user_model(tuned, y), guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(y)
    names = set(pyro.get_param_store().keys())
    assert {"tuned$$$schedule.gamma_min", "tuned$$$schedule.gamma_max", "tuned$$$decoder_log_scale"} <= names
    assert not torch.equal(before["schedule.gamma_min"], diffusion.schedule.gamma_min.detach())


# ---------------------------------------------------------------------------- the methods
@pytest.mark.parametrize("case", list(CASES))
def test_twisted_smc_matches_the_exact_conditional_on_the_grid(case):
    make, num_steps = CASES[case]
    diffusion = make()
    before = _state(diffusion)
    post_mean, post_cov, log_evidence = exact_conditional(diffusion, OBSERVATION, Y, num_steps)
    N = 4000
    result = twisted_smc(diffusion, OBSERVATION, Y, num_particles=N, num_steps=num_steps, seed=0)
    assert result.num_steps == K and result.network_calls == K  # the twist needs x̂ at x_1 too
    assert result.diagnostics["ess"].shape == (K + 1,) and result.draws.shape == (N, 2)
    ess = result.ess
    se = (post_cov.diagonal() / ess).sqrt()
    assert ((result.mean() - post_mean).abs() < 5 * se).all(), (result.mean(), post_mean, se)
    log_hat = result.diagnostics["log_evidence"]
    assert abs(log_hat - log_evidence) < 5 / math.sqrt(ess), (log_hat, log_evidence)
    _unchanged(diffusion, before)
    idata = pd_arviz.from_result(result)
    assert idata.smc_diagnostics["ess"].shape == (K + 1,)


@pytest.mark.parametrize("case", ["learned-plain", "ddpm100-subgrid"])
def test_nuts_on_a_ten_level_grid_matches_the_exact_conditional(case):
    make, num_steps = CASES[case]
    diffusion = make()
    before = _state(diffusion)
    post_mean, post_cov, _ = exact_conditional(diffusion, OBSERVATION, Y, num_steps)
    draws = 30
    result = nuts_conditional(
        diffusion,
        OBSERVATION,
        Y,
        num_samples=draws,
        warmup_steps=30,
        num_chains=4,
        num_steps=num_steps,
        vectorize_chains=True,
        jit_compile=True,  # the same draws (test_nuts_jit_compile_gives_the_same_draws), half the time
        seed=0,
    )
    assert result.num_steps == K and result.chains().shape == (4, draws, 2)
    assert set(result.diagnostics["noise"]) == {f"x/x_{k}_decentered" for k in range(K + 1)}
    per_chain = K - 1 + int(diffusion.decoder_uses_network)
    assert result.network_calls == result.diagnostics["potential_evaluations"] * per_chain
    summary = az.summary(pd_arviz.from_nuts(result), var_names=["x0"])
    assert summary["r_hat"].max() < 1.2
    se = (post_cov.diagonal() / torch.tensor(summary["ess_bulk"].values)).sqrt()
    mean = result.draws.double().mean(0)
    assert ((mean - post_mean).abs() < 5 * se).all(), (mean, post_mean, se)
    _unchanged(diffusion, before)


@pytest.mark.parametrize("case", ["learned-plain", "ddpm100-subgrid"])
def test_svi_on_the_grid_reaches_the_mean_field_optimum_of_its_bound(case):
    """svi_conditional maximizes E_q[log p(y|x_0) + ELBO_θ(x_0)] + H(q) over mean-field
    Normals; for a linear chain ELBO_θ is quadratic in x_0 and the optimum is closed-form
    (inference_helpers.mean_field_optimum).  The final iterate within the optimizer's noise
    (the tolerances of the linear-chain SVI test), and the mean of the last 50 loss
    estimates within 4 of their standard errors of the optimal −ELBO."""
    make, num_steps = CASES[case]
    diffusion = make()
    before = _state(diffusion)
    mu, s, optimum = mean_field_optimum(diffusion, OBSERVATION, Y, num_steps)
    result = svi_conditional(
        diffusion, OBSERVATION, Y, num_iterations=300, num_particles=32, lr=0.05, num_steps=num_steps, seed=0
    )
    assert result.num_steps == K
    loc, scale = result.diagnostics["loc"].double(), result.diagnostics["scale"].double()
    assert ((loc - mu).abs() < 0.15).all(), (loc, mu)
    assert ((scale - s).abs() < 0.1).all(), (scale, s)
    tail = torch.tensor(result.diagnostics["losses"][-50:], dtype=torch.float64)
    se = tail.std() / math.sqrt(tail.numel())
    assert abs(tail.mean() - optimum) < 4 * se, (tail.mean(), optimum, se)
    # one network call per step of the chain (and the decoder's) per ELBO evaluation
    per_chain = K - 1 + int(diffusion.decoder_uses_network)
    assert result.network_calls == 300 * per_chain
    _unchanged(diffusion, before)


@pytest.mark.parametrize("case", list(CASES))
def test_dps_and_replacement_run_on_the_grid(case):
    make, num_steps = CASES[case]
    diffusion = make()
    before = _state(diffusion)
    torch.manual_seed(0)
    dps = dps_sample(diffusion, OBSERVATION, Y, 2000, step_size=0.1, num_steps=num_steps)
    assert dps.draws.shape == (2000, 2) and dps.num_steps == K and dps.network_calls == K
    prior = DiffusionPrior(diffusion, num_steps=num_steps)
    with torch.no_grad(), pyro.plate("draws", 2000):
        unconditional = prior("x")
    # DPS moves the draws toward the data fit: a smaller mean residual than the prior's, by
    # more than 4 standard errors of the difference
    r_dps = (OBSERVATION.mean(dps.draws.double()) - Y).abs().squeeze(-1)
    r_prior = (OBSERVATION.mean(unconditional.double()) - Y).abs().squeeze(-1)
    gap = r_prior.mean() - r_dps.mean()
    assert gap > 4 * math.hypot(r_prior.std() / 2000**0.5, r_dps.std() / 2000**0.5), gap
    mask = LinearObservation.mask(torch.tensor([True, False]), noise_scale=0.1)
    replaced = replacement_sample(diffusion, mask, torch.tensor([0.7]), 50, num_steps=num_steps)
    assert torch.all(replaced.draws[:, 0] == 0.7) and replaced.num_steps == K
    assert replaced.network_calls == K - 1 + int(diffusion.decoder_uses_network)
    _unchanged(diffusion, before)


def test_chain_guide_on_a_subgrid_draws_the_core_forward_chain_of_that_grid():
    """chain_guide(num_steps=K) samples the same posterior-order chain as the core guide on
    the K-level grid: with the same seed, every site has the same value."""
    for diffusion in (gaussian_ddpm(100), learned_gaussian_diffusion()):
        x0 = torch.randn(3, 2)
        pyro.set_rng_seed(7)
        core = poutine.trace(diffusion.guide).get_trace(x0, num_steps=K)
        pyro.set_rng_seed(7)
        scoped = poutine.trace(chain_guide).get_trace(diffusion, x0, "a", num_steps=K)
        for k in range(1, K + 1):
            torch.testing.assert_close(
                scoped.nodes[site_name(k, "a/")]["value"], core.nodes[site_name(k)]["value"]
            )
        assert site_name(K + 1, "a/") not in scoped.nodes
