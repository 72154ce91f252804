"""Twisted SMC's Gaussian proposal (the reverse step times the twist linearized about the
step's mean, drawn and weighted exactly) and the projected twist covariance σ_y² I + r_k A Aᵀ:
both keep the target (the exact posterior of a mixture prior with a dense, non-orthogonal A);
on a unit-variance Gaussian prior the projected ΠGDM twist is the exact p(y | x_k), so with the
Gaussian proposal and the analytic variances every weight is the same and the evidence estimate
is exact; bad arguments are named."""

import math

import pytest
import torch

from pyro_diffusion.inference import (
    DiagonalMixture,
    LinearObservation,
    analytic_variances,
    mixture_diffusion,
    mixture_posterior,
    twisted_smc,
)

# rows of unit norm at 45° to each other: A Aᵀ is far from I
DENSE = torch.tensor([[1.0, 0.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5), 0.0]])
UNIT = DiagonalMixture(torch.ones(1), torch.tensor([[0.4, -0.2, 0.1]]), torch.ones(1, 3))
DIAGONAL = DiagonalMixture(torch.ones(1), torch.tensor([[0.4, -0.2, 0.1]]), torch.tensor([[0.3, 0.6, 1.2]]))
MIXTURE = DiagonalMixture(
    torch.tensor([1.0, 2.0]),
    torch.tensor([[-1.0, 0.0, 0.5], [1.0, 0.5, -0.5]]),
    torch.tensor([[0.2, 0.3, 0.4], [0.3, 0.2, 0.3]]),
)


def _moments(result):
    w = result.weights.double()
    x = result.draws.double()
    mean = (w[:, None] * x).sum(0)
    return mean, (w[:, None] * (x - mean) ** 2).sum(0)


@pytest.mark.parametrize(
    "proposal, covariance", [("gaussian", "isotropic"), ("gaussian", "projected"), ("gradient", "projected")]
)
def test_the_new_options_keep_the_exact_posterior_of_a_mixture(proposal, covariance):
    diffusion = mixture_diffusion(MIXTURE)
    observation = LinearObservation(DENSE, (3,), 0.1)
    y = torch.tensor([0.8, 0.9])
    exact = mixture_posterior(MIXTURE, observation, y)
    result = twisted_smc(
        diffusion,
        observation,
        y,
        num_particles=8000,
        num_steps=50,
        proposal=proposal,
        twist_covariance=covariance,
        seed=0,
    )
    assert result.diagnostics["proposal"] == proposal
    assert result.diagnostics["twist_covariance"] == covariance
    assert result.network_calls == 50
    mean, var = _moments(result)
    exact_var = exact.variance
    se = (exact_var / result.ess).sqrt()
    # the chain on 50 levels is not the exact prior: allow its bias on top of 5 standard errors
    assert ((mean - exact.mean).abs() < 5 * se + 0.03).all(), (mean, exact.mean, se)
    assert ((var / exact_var).log().abs() < 0.25).all(), (var, exact_var)


@pytest.mark.parametrize("prior, twist", [(UNIT, "pigdm"), (DIAGONAL, "analytic")])
def test_on_a_gaussian_prior_the_projected_twist_and_gaussian_proposal_are_exact(prior, twist):
    # prior N(m, I): Cov[x_0 | x_k] = σ_k² I exactly, so the projected ΠGDM twist is p(y | x_k);
    # prior N(m, diag s²): the per-coordinate analytic estimate of Cov[x_0 | x_k] is exact too.
    # With the analytic variances the 50-level chain is exact for a Gaussian prior, and the
    # linearized move is then the exact conditional step: every weight is the same
    diffusion = mixture_diffusion(prior)
    observation = LinearObservation(DENSE, (3,), 0.05)
    y = torch.tensor([1.0, 0.2])
    data = prior.sample(20000, torch.Generator().manual_seed(0)).float()
    rv = analytic_variances(diffusion, data, num_steps=50, diagonal=True, seed=0)
    runs = {}
    for proposal, covariance in (
        ("gaussian", "projected"),
        ("gaussian", "isotropic"),
        ("gradient", "projected"),
    ):
        runs[proposal, covariance] = twisted_smc(
            diffusion,
            observation,
            y,
            num_particles=2000,
            num_steps=50,
            proposal=proposal,
            twist_covariance=covariance,
            reverse_variance=rv,
            twist_variance=twist,
            ess_threshold=0.0,  # never resample: the final ESS measures the whole chain's weights
            seed=1,
        )
    exact_run = runs["gaussian", "projected"]
    # Γ_k is estimated from 20000 draws: near-exact, not exact, on the diagonal prior
    assert exact_run.ess > (0.999 if twist == "pigdm" else 0.99) * 2000, exact_run.diagnostics["ess"]
    for key in (("gaussian", "isotropic"), ("gradient", "projected")):
        assert runs[key].ess < 0.5 * 2000, (key, runs[key].ess)
    exact = mixture_posterior(prior, observation, y)
    mean, var = _moments(exact_run)
    assert ((mean - exact.mean).abs() < 5 * (exact.variance / exact_run.ess).sqrt()).all()
    assert ((var / exact.variance).log().abs() < 0.1).all(), (var, exact.variance)
    # the evidence estimate equals the exact marginal likelihood N(y; A m, A Aᵀ + σ_y² I)
    A = DENSE.double()
    cov_y = (A * prior.scales[0] ** 2) @ A.T + 0.05**2 * torch.eye(2, dtype=torch.float64)
    truth = torch.distributions.MultivariateNormal(A @ prior.means[0], cov_y).log_prob(y.double())
    assert abs(exact_run.diagnostics["log_evidence"] - truth.item()) < 0.005


def test_the_gaussian_proposal_refuses_what_it_cannot_do_by_name():
    diffusion = mixture_diffusion(MIXTURE)
    observation = LinearObservation(DENSE, (3,), 0.1)
    y = torch.tensor([0.8, 0.9])
    with pytest.raises(ValueError, match="proposal"):
        twisted_smc(diffusion, observation, y, num_steps=10, proposal="newton")
    with pytest.raises(ValueError, match="twist_covariance"):
        twisted_smc(diffusion, observation, y, num_steps=10, twist_covariance="full")
    with pytest.raises(ValueError, match="tempering"):
        twisted_smc(diffusion, observation, y, num_steps=10, proposal="gaussian", tempering="linear")
    with pytest.raises(ValueError, match="twist_variance"):
        twisted_smc(diffusion, observation, y, num_steps=10, proposal="gaussian", twist_variance="none")


def test_the_default_sampler_is_unchanged_by_the_new_options():
    diffusion = mixture_diffusion(MIXTURE)
    observation = LinearObservation(DENSE, (3,), 0.1)
    y = torch.tensor([0.8, 0.9])
    plain = twisted_smc(diffusion, observation, y, num_particles=64, num_steps=10, seed=3)
    explicit = twisted_smc(
        diffusion,
        observation,
        y,
        num_particles=64,
        num_steps=10,
        proposal="gradient",
        twist_covariance="isotropic",
        seed=3,
    )
    assert torch.equal(plain.draws, explicit.draws) and torch.equal(plain.log_weights, explicit.log_weights)
