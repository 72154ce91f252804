"""NUTS and SVI on the non-centred chain at dimension: the vectorized potential against the
per-site Pyro model, the preconditioner, starts from draws, the noise guides of SVI, argument
errors, and the quick run of ``experiments.posterior_mcmc``."""

import json

import pyro
import pytest
import torch
from inference_helpers import exact_conditional
from pyro import poutine
from pyro.infer.mcmc.util import initialize_model
from pyro.infer.reparam import LocScaleReparam

from pyro_diffusion.inference import (
    DiagonalMixture,
    LinearObservation,
    mixture_diffusion,
    nuts_conditional,
    svi_conditional,
)
from pyro_diffusion.inference.nuts import (
    LowRankPreconditioner,
    chain_x0,
    conditional_model,
    noise_from_draws,
    noise_model,
    noise_site,
)
from pyro_diffusion.inference.prior import DiffusionPrior, frozen

D = 4
OBSERVATION = LinearObservation(torch.tensor([[1.0, 0.5, 0.0, -0.5], [0.0, 1.0, 1.0, 0.0]]), (D,), 0.2)
Y = torch.tensor([0.8, -0.4])


K = 8  # the sub-grid every test runs on


def _diffusion():
    """The exact denoiser of one diagonal Gaussian: the chain is linear on any grid, so the
    posterior on the K-level grid is Gaussian and known."""
    prior = DiagonalMixture(
        torch.ones(1), torch.linspace(-0.5, 0.5, D)[None], torch.linspace(0.4, 0.8, D)[None]
    )
    return mixture_diffusion(prior, num_steps=100)


def _potentials(diffusion, copies=None):
    """U of the vectorized and of the per-site program, from Pyro's initialize_model."""
    prior = DiffusionPrior(diffusion, num_steps=K, decoder="gaussian")
    names = prior.site_names("x")

    def wrap(program):
        def model(prior, observation, y):
            if copies is None:
                return program(prior, observation, y)
            with pyro.plate("chains", copies, dim=-1):
                return program(prior, observation, y)

        return model

    per_site = poutine.reparam(wrap(conditional_model), config={n: LocScaleReparam(0.0) for n in names})
    out = []
    for model in (wrap(noise_model), per_site):
        _, potential_fn, _, _ = initialize_model(
            model, model_args=(prior, OBSERVATION, Y), max_plate_nesting=0 if copies is None else 1
        )
        out.append(potential_fn)
    return prior, names, out


@pytest.mark.parametrize("copies", [None, 3], ids=["one-chain", "plate-of-copies"])
def test_the_vectorized_potential_equals_the_per_site_models_log_density(copies):
    diffusion = _diffusion()
    prior, names, (vectorized, per_site) = _potentials(diffusion, copies)
    torch.manual_seed(0)
    shape = (K + 1, D) if copies is None else (copies, K + 1, D)
    with frozen(diffusion):
        for _ in range(3):
            noise = 1.5 * torch.randn(shape)
            u_vec = vectorized({noise_site("x"): noise})
            dim = noise.dim() - 2
            u_site = per_site({f"{n}_decentered": noise.select(dim, i) for i, n in enumerate(names)})
            torch.testing.assert_close(u_vec, u_site, rtol=1e-5, atol=1e-4)
            # and −U is log N(noise; 0, I) + log p(y | x_0) with x_0 pushed down the chain
            x0 = chain_x0(prior, noise)
            lp = torch.distributions.Normal(0.0, 1.0).log_prob(noise).sum()
            lp = lp + OBSERVATION.distribution(x0).log_prob(Y).sum()
            torch.testing.assert_close(-u_vec, lp, rtol=1e-5, atol=1e-4)
    # a different noise gives a different potential (the check can fail)
    assert not torch.allclose(vectorized({noise_site("x"): torch.zeros(shape)}), u_vec)


def test_chain_x0_is_the_priors_chain_and_noise_from_draws_starts_near_the_draws():
    diffusion = _diffusion()
    prior = DiffusionPrior(diffusion, num_steps=K, decoder="gaussian")
    noise = torch.randn(6, K + 1, D)
    expected = prior.chain_from_noise({K - i: noise[:, i] for i in range(K + 1)})
    torch.testing.assert_close(chain_x0(prior, noise), expected)
    x0 = torch.randn(500, D)
    z = noise_from_draws(prior, x0, torch.Generator().manual_seed(0))
    assert z.shape == (500, K + 1, D)
    # the chain rebuilt from the noises ends near the draws it started from (the model's
    # reverse chain is not the forward chain, so not exactly)
    assert (chain_x0(prior, z) - x0).pow(2).mean() < 0.5 * x0.pow(2).mean()
    with pytest.raises(ValueError, match="noise"):
        chain_x0(prior, torch.randn(6, K, D))


def test_the_preconditioner_is_the_inverse_square_root_of_the_gauss_newton_curvature():
    diffusion = _diffusion()
    prior = DiffusionPrior(diffusion, num_steps=K, decoder="gaussian")
    z = torch.randn(2, K + 1, D)
    pre = LowRankPreconditioner(prior, OBSERVATION, z)
    w = torch.randn(5, 2, K + 1, D)
    torch.testing.assert_close(pre.inverse(pre.forward(w)), w, rtol=1e-4, atol=1e-4)
    # L Lᵀ = (I + Jᵀ Aᵀ A J / σ²)⁻¹ for copy 0, with J from autograd
    n = (K + 1) * D
    with frozen(diffusion):
        J = torch.autograd.functional.jacobian(
            lambda v: OBSERVATION.mean(chain_x0(prior, v.reshape(K + 1, D))), z[0].reshape(-1)
        )
    H = J.T.double() @ J.double() / 0.2**2
    L = torch.stack(
        [
            pre.forward(e.reshape(1, 1, K + 1, D).expand(1, 2, K + 1, D))[0, 0].reshape(-1)
            for e in torch.eye(n)
        ],
        1,
    )
    torch.testing.assert_close(
        (L.double() @ L.double().T) @ (torch.eye(n, dtype=torch.float64) + H),
        torch.eye(n, dtype=torch.float64),
        rtol=1e-3,
        atol=1e-3,
    )


def _check_moments(draws, mean, cov, ess, var_tol):
    x = draws.double()
    se = (cov.diagonal() / ess).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se).all(), (x.mean(0), mean, se)
    ratio = x.var(0) / cov.diagonal()
    assert ((ratio > 1 - var_tol) & (ratio < 1 + var_tol)).all(), ratio


@pytest.mark.parametrize("precondition", [False, True], ids=["plain", "preconditioned"])
def test_nuts_from_draws_lands_on_the_known_posterior(precondition):
    import arviz as az

    from pyro_diffusion.inference.arviz import from_nuts

    diffusion = _diffusion()
    mean, cov, _ = exact_conditional(diffusion, OBSERVATION, Y, num_steps=K)
    start = torch.randn(8, D)  # a poor start: the chains must move to the posterior
    result = nuts_conditional(
        diffusion,
        OBSERVATION,
        Y,
        num_samples=30,
        warmup_steps=30,
        num_chains=8,
        num_steps=K,
        vectorize_chains=True,
        init=start,
        precondition=precondition,
        jit_compile=True,
        max_tree_depth=4,
        seed=0,
    )
    assert result.draws.shape == (240, D) and result.diagnostics["init"] == "draws"
    assert result.diagnostics["precondition"] is precondition
    summary = az.summary(from_nuts(result), var_names=["x0"])
    assert summary["r_hat"].max() < 1.1
    _check_moments(result.draws, mean, cov, torch.tensor(summary["ess_bulk"].values), var_tol=0.35)


@pytest.mark.parametrize("guide", ["noise-normal", "noise-lowrank"])
def test_svi_noise_guides_land_near_the_known_posterior(guide):
    diffusion = _diffusion()
    mean, cov, _ = exact_conditional(diffusion, OBSERVATION, Y, num_steps=K)
    result = svi_conditional(
        diffusion,
        OBSERVATION,
        Y,
        guide=guide,
        rank=12,
        num_steps=K,
        num_iterations=400,
        num_particles=16,
        lr=0.03,
        init_scale=0.5,
        num_draws=4000,
        seed=0,
    )
    assert result.diagnostics["guide"] == guide and result.draws.shape == (4000, D)
    assert len(result.diagnostics["losses"]) == 400 and result.diagnostics["seconds_per_step"] > 0
    assert result.network_calls == 400 * (K - 1 + int(diffusion.decoder_uses_network))
    # the chain is linear, so the posterior over the noises is Gaussian: the mean is the
    # optimum of both guides; the diagonal guide under-covers the correlated variances
    x = result.draws.double()
    assert ((x.mean(0) - mean).abs() < 0.1 * cov.diagonal().sqrt() + 0.02).all(), (x.mean(0), mean)
    ratio = x.var(0) / cov.diagonal()
    low = 0.4 if guide == "noise-normal" else 0.75
    assert ((ratio > low) & (ratio < 1.25)).all(), ratio
    assert result.sample(10).shape == (10, D)


def test_bad_arguments_are_named():
    diffusion = _diffusion()
    with pytest.raises(ValueError, match="num_samples"):
        nuts_conditional(diffusion, OBSERVATION, Y, num_steps=K, num_samples=1)
    with pytest.raises(ValueError, match="potential"):
        nuts_conditional(diffusion, OBSERVATION, Y, num_steps=K, potential="loop")
    with pytest.raises(ValueError, match="precondition"):
        nuts_conditional(diffusion, OBSERVATION, Y, num_steps=K, potential="per-site", precondition=True)
    with pytest.raises(ValueError, match="init"):
        nuts_conditional(diffusion, OBSERVATION, Y, num_steps=K, num_chains=2, init=torch.zeros(1, D))
    with pytest.raises(ValueError, match="init"):
        nuts_conditional(diffusion, OBSERVATION, Y, num_steps=K, num_chains=1, init=torch.zeros(2, D + 1))
    with pytest.raises(TypeError, match="init"):
        nuts_conditional(diffusion, OBSERVATION, Y, num_steps=K, init="smc")
    with pytest.raises(ValueError, match="guide"):
        svi_conditional(diffusion, OBSERVATION, Y, guide="flow")
    with pytest.raises(ValueError, match="rank"):
        svi_conditional(diffusion, OBSERVATION, Y, guide="noise-lowrank", rank=0)
    with pytest.raises(ValueError, match="num_particles"):
        svi_conditional(diffusion, OBSERVATION, Y, guide="noise-normal", num_particles=0)


def test_the_quick_run_writes_only_under_out(tmp_path):
    from pyro_diffusion.experiments import posterior_mcmc

    out = tmp_path / "mcmc"
    posterior_mcmc.main(["--quick", "--out", str(out), "--no-progress"])
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "table.md"]
    data = json.loads((out / "results.json").read_text())
    for cell in data["summary"]:
        methods = cell["methods"]
        assert {"floor", "ceiling", "nuts", "svi", "tds"} <= set(methods)
        assert methods["floor"]["sw"] < methods["ceiling"]["sw"]
        assert methods["nuts"]["network_calls"] > 0 and methods["svi"]["seconds"] > 0
    table = (out / "table.md").read_text()
    assert "exact (floor)" in table and "nuts" in table


def test_the_quick_run_takes_the_rows_with_analytic_variances(tmp_path):
    from pyro_diffusion.experiments import posterior_mcmc

    out = tmp_path / "mcmc"
    methods = ["tds@K", "tds@K-av", "nuts-av", "svi-av"]
    posterior_mcmc.main(["--quick", "--out", str(out), "--no-progress", "--methods", *methods])
    rows = json.loads((out / "results.json").read_text())["summary"][0]["methods"]
    assert set(methods) <= set(rows)
    assert rows["nuts-av"]["network_calls"] > rows["tds@K-av"]["network_calls"] > 0
    assert rows["svi-av"]["seconds"] > 0 and rows["tds@K-av"]["sw"] > 0


def test_write_docs_inserts_or_replaces_only_section_9(tmp_path):
    from pyro_diffusion.experiments.posterior_mcmc import SECTION_TITLE, write_docs

    path = tmp_path / "prior.md"
    path.write_text("# Title\n\n## 8. Study\n\nold table\n")
    write_docs(path, f"{SECTION_TITLE}\n\nfirst\n")
    assert path.read_text() == f"# Title\n\n## 8. Study\n\nold table\n\n{SECTION_TITLE}\n\nfirst\n"
    # a section after it (e.g. §8 rewritten at the end) is kept when §9 is replaced
    path.write_text(path.read_text() + "\n## 10. Later\n\nkeep\n")
    write_docs(path, f"{SECTION_TITLE}\n\nsecond\n")
    text = path.read_text()
    assert "first" not in text and "second" in text and "## 10. Later\n\nkeep\n" in text
    assert text.startswith("# Title\n\n## 8. Study\n\nold table\n")
