"""Per-level reverse variances estimated from the network (Analytic-DPM) and the posterior
samplers that take them: the estimate against its closed form on a Gaussian prior, the K-step
chain's marginal variance, twisted SMC and MCGdiff against the exact posterior on a coarse grid,
systematic resampling of weighted draws, argument errors."""

import pytest
import torch

from pyro_diffusion.inference import (
    DiagonalMixture,
    LinearObservation,
    PosteriorResult,
    mcgdiff,
    mixture_diffusion,
    mixture_posterior,
    twisted_smc,
)
from pyro_diffusion.inference.variances import ReverseVariances, analytic_variances, ancestral_sample

GAUSSIAN = DiagonalMixture(torch.ones(1), torch.tensor([[0.3, -0.5]]), torch.tensor([[0.2, 0.7]]))
MIXTURE = DiagonalMixture(
    torch.ones(2), torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([[0.1, 0.3], [0.2, 0.1]])
)


def _data(mixture, n=4000, seed=0):
    return mixture.sample(n, torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("estimator", ["analytic", "residual"])
def test_gamma_estimate_matches_its_closed_form_on_a_gaussian_prior(estimator):
    diffusion = mixture_diffusion(GAUSSIAN)
    rv = analytic_variances(
        diffusion, _data(GAUSSIAN, 20000), num_steps=20, estimator=estimator, diagonal=True, seed=0
    )
    g = rv.grid[:, None]
    exact = torch.sigmoid(g) / (torch.sigmoid(-g) * GAUSSIAN.scales**2 + torch.sigmoid(g))
    assert rv.gamma_hat.shape == (20, 2)
    # the residual form's Monte Carlo error is that of a χ² mean: sd √(2/M) ≈ 0.01 per coordinate
    atol = 0.01 if estimator == "analytic" else 0.04
    assert torch.allclose(rv.gamma_hat, exact, rtol=0.05, atol=atol)
    iso = analytic_variances(diffusion, _data(GAUSSIAN, 20000), num_steps=20, estimator=estimator, seed=0)
    assert iso.variances.shape == (20,)
    assert torch.allclose(iso.gamma_hat, exact.mean(-1), rtol=0.05, atol=atol)
    assert iso.evaluations == 20000 * 20


def test_analytic_variances_bring_the_coarse_chain_marginal_to_the_truth():
    K = 10
    torch.manual_seed(0)
    for mixture, diagonal in ((GAUSSIAN, True), (MIXTURE, False)):
        truth = mixture.sample(200000).var(0)
        errors = {}
        for variance in ("small", "large"):
            draws = ancestral_sample(
                mixture_diffusion(mixture, variance=variance), 100000, num_steps=K, seed=1
            )
            errors[variance] = (draws.double().var(0) / truth).log().abs().sum().item()
        diffusion = mixture_diffusion(mixture)
        rv = analytic_variances(diffusion, _data(mixture), num_steps=K, diagonal=diagonal, seed=0)
        draws = ancestral_sample(diffusion, 100000, num_steps=K, reverse_variance=rv, seed=1)
        errors["analytic"] = (draws.double().var(0) / truth).log().abs().sum().item()
        assert errors["analytic"] < 0.5 * min(errors["small"], errors["large"]), errors


def test_diagonal_variances_make_the_gaussian_chain_exact():
    diffusion = mixture_diffusion(GAUSSIAN)
    rv = analytic_variances(diffusion, _data(GAUSSIAN, 20000), num_steps=10, diagonal=True, seed=0)
    draws = ancestral_sample(diffusion, 100000, num_steps=10, reverse_variance=rv, seed=1).double()
    assert torch.allclose(draws.var(0), GAUSSIAN.scales[0] ** 2, rtol=0.04)
    assert torch.allclose(draws.mean(0), GAUSSIAN.means[0], atol=0.01)


@pytest.mark.parametrize("sampler", ["twisted_smc", "mcgdiff"])
def test_posterior_samplers_with_analytic_variances_reach_the_exact_posterior(sampler):
    # a Gaussian prior on a 10-level grid: with the model's "small" variances the chain's
    # posterior is too narrow; with the diagonal analytic variances it is the exact one
    diffusion = mixture_diffusion(GAUSSIAN)
    observation = LinearObservation(torch.tensor([[0.6, 0.8]]), (2,), 0.3)
    y = torch.tensor([0.2])
    exact = mixture_posterior(GAUSSIAN, observation, y)
    exact_var = exact.component_distribution.covariance_matrix[0].diag()
    rv = analytic_variances(diffusion, _data(GAUSSIAN, 20000), num_steps=10, diagonal=True, seed=0)
    run = twisted_smc if sampler == "twisted_smc" else mcgdiff
    errors = {}
    for name, variances in (("model", None), ("analytic", rv)):
        result = run(
            diffusion, observation, y, num_particles=20000, num_steps=10, reverse_variance=variances, seed=0
        )
        assert result.diagnostics["reverse_variance"] == ("model" if variances is None else "analytic")
        draws = result.draws.double()
        mean = result.mean()
        var = (result.weights[:, None] * (draws - mean) ** 2).sum(0)
        errors[name] = (var / exact_var).log().abs().max().item()
        if variances is not None:
            assert ((mean - exact.mean).abs() < 0.03).all()
    assert errors["analytic"] < 0.06, errors
    assert errors["model"] > 2 * errors["analytic"], errors


def test_analytic_twist_variance_runs_and_needs_the_variances():
    diffusion = mixture_diffusion(MIXTURE)
    observation = LinearObservation(torch.tensor([[1.0, 0.0]]), (2,), 0.1)
    y = torch.tensor([0.9])
    rv = analytic_variances(diffusion, _data(MIXTURE), num_steps=20, seed=0)
    result = twisted_smc(
        diffusion,
        observation,
        y,
        num_particles=4000,
        num_steps=20,
        reverse_variance=rv,
        twist_variance="analytic",
        seed=0,
    )
    exact = mixture_posterior(MIXTURE, observation, y)
    assert (result.mean() - exact.mean).abs().max() < 0.05
    with pytest.raises(ValueError, match="twist_variance"):
        twisted_smc(diffusion, observation, y, num_steps=20, twist_variance="analytic")


def test_systematic_resampling_of_weighted_draws():
    draws = torch.arange(6.0)[:, None]
    equal = PosteriorResult(draws=draws, log_weights=torch.full((6,), -torch.log(torch.tensor(6.0))))
    picked = equal.sample(6, torch.Generator().manual_seed(0), scheme="systematic")
    assert sorted(picked.flatten().tolist()) == draws.flatten().tolist()
    w = torch.tensor([0.1, 0.2, 0.0, 0.3, 0.15, 0.25])
    weighted = PosteriorResult(draws=draws, log_weights=w.log())
    picks = weighted.sample(20000, torch.Generator().manual_seed(1), scheme="systematic").flatten().long()
    freq = torch.bincount(picks, minlength=6).float() / picks.numel()
    assert torch.allclose(freq, w, atol=1e-3)
    with pytest.raises(ValueError, match="scheme"):
        weighted.sample(5, scheme="residual")


def test_bad_variance_arguments_are_named():
    diffusion = mixture_diffusion(GAUSSIAN)
    observation = LinearObservation(torch.tensor([[0.6, 0.8]]), (2,), 0.3)
    y = torch.tensor([0.2])
    rv = analytic_variances(diffusion, _data(GAUSSIAN, 200), num_steps=10)
    assert isinstance(rv, ReverseVariances) and rv.num_steps == 10
    with pytest.raises(ValueError, match="reverse_variance"):
        twisted_smc(diffusion, observation, y, num_steps=20, reverse_variance=rv)
    with pytest.raises(ValueError, match="reverse_variance"):
        mcgdiff(diffusion, observation, y, num_steps=20, reverse_variance=rv)
    with pytest.raises(TypeError, match="reverse_variance"):
        twisted_smc(diffusion, observation, y, num_steps=10, reverse_variance=torch.ones(10))
    with pytest.raises(ValueError, match="estimator"):
        analytic_variances(diffusion, num_steps=10, estimator="optimal")
    with pytest.raises(ValueError, match="data"):
        analytic_variances(diffusion, torch.zeros(10, 3), num_steps=10)
    with pytest.raises(ValueError, match="num_samples"):
        analytic_variances(diffusion, num_steps=10, num_samples=1)
    # from the model's own draws: M more evaluations per level; the coarse chain's draws are
    # too narrow (its "small" variances), which biases Γ a little at intermediate levels
    own = analytic_variances(diffusion, num_steps=10, num_samples=1000, seed=0)
    assert own.evaluations == 2 * 1000 * 10
    from_data = analytic_variances(diffusion, _data(GAUSSIAN, 4000), num_steps=10, seed=0)
    assert torch.allclose(own.gamma_hat, from_data.gamma_hat, atol=0.2)


def test_the_study_replaces_only_its_own_docs_section(tmp_path):
    from pyro_diffusion.experiments import posterior_study

    doc = tmp_path / "prior.md"
    title = posterior_study.SECTION_TITLE
    doc.write_text(f"# Guide\n\n## 7. Before\n\ntext\n\n{title}\n\nold table\n\n## 9. After\n\nkept\n")
    posterior_study.write_docs(doc, f"{title}\n\nnew table\n")
    text = doc.read_text()
    assert "old table" not in text and "new table" in text
    assert text.index("## 7. Before") < text.index(title) < text.index("## 9. After")
    assert text.endswith("## 9. After\n\nkept\n")
    doc.write_text("# Guide\n")
    posterior_study.write_docs(doc, f"{title}\n\nnew table\n")
    assert doc.read_text() == f"# Guide\n\n{title}\n\nnew table\n"


def test_a_docs_rewrite_keeps_the_sections_hand_written_notes(tmp_path):
    from pyro_diffusion.experiments import posterior_study

    doc = tmp_path / "prior.md"
    title, notes = posterior_study.SECTION_TITLE, posterior_study.NOTES_START
    doc.write_text(
        f"# Guide\n\n{title}\n\nold table\n\n{notes} (by hand):\n\n* kept\n\n## 9. After\n\nkept too\n"
    )
    posterior_study.write_docs(doc, f"{title}\n\nnew table\n")
    assert (
        doc.read_text()
        == f"# Guide\n\n{title}\n\nnew table\n\n{notes} (by hand):\n\n* kept\n\n## 9. After\n\nkept too\n"
    )


def test_the_prior_nuts_and_svi_take_the_analytic_variances():
    from pyro_diffusion.inference import DiffusionPrior, nuts_conditional, svi_conditional

    diffusion = mixture_diffusion(GAUSSIAN)
    rv = analytic_variances(diffusion, _data(GAUSSIAN, 20000), num_steps=10, diagonal=True, seed=0)
    prior = DiffusionPrior(diffusion, num_steps=10, reverse_variance=rv)
    x = torch.zeros(5, 2)
    for k in (1, 4, 10):
        step = prior.step_distribution(x, k).base_dist
        assert torch.allclose(step.scale, rv.scale(k, step.loc))
    plain = DiffusionPrior(diffusion, num_steps=10).step_distribution(x, 4).base_dist
    assert torch.allclose(prior.step_distribution(x, 4).base_dist.loc, plain.loc)
    # the prior's chain is the analytic one: its marginal variance is the data's (the model's
    # "small" variances give a visibly narrower one, see the test above)
    torch.manual_seed(0)
    noise = {k: torch.randn(40000, 2) for k in range(11)}
    draws = prior.chain_from_noise(noise).double()
    assert torch.allclose(draws.var(0), GAUSSIAN.scales[0] ** 2, rtol=0.05)
    observation = LinearObservation(torch.tensor([[0.6, 0.8]]), (2,), 0.3)
    y = torch.tensor([0.2])
    nuts = nuts_conditional(
        diffusion,
        observation,
        y,
        num_samples=4,
        warmup_steps=4,
        num_chains=2,
        num_steps=10,
        reverse_variance=rv,
    )
    svi = svi_conditional(
        diffusion,
        observation,
        y,
        num_iterations=5,
        num_steps=10,
        guide="noise-normal",
        num_draws=8,
        reverse_variance=rv,
    )
    assert nuts.draws.shape == (8, 2) and svi.draws.shape == (8, 2)
    with pytest.raises(ValueError, match="reverse_variance"):
        DiffusionPrior(diffusion, num_steps=20, reverse_variance=rv)  # estimated on another grid
    with pytest.raises(ValueError, match="reverse_variance"):
        DiffusionPrior(diffusion, num_steps=10, reverse_variance=rv, fine_tune=True)
    with pytest.raises(ValueError, match="reverse_variance"):
        nuts_conditional(diffusion, observation, y, num_samples=4, num_steps=20, reverse_variance=rv)


def test_variances_estimated_at_a_few_levels_and_interpolated():
    # on a Gaussian prior logit Γ is linear in γ: 10 estimated levels of 50 give the same
    # variances as all 50 (to the Monte Carlo error), at a fifth of the evaluations
    diffusion = mixture_diffusion(GAUSSIAN)
    data = _data(GAUSSIAN, 20000)
    full = analytic_variances(diffusion, data, num_steps=50, diagonal=True, seed=0)
    few = analytic_variances(diffusion, data, num_steps=50, diagonal=True, num_levels=10, seed=0)
    assert few.evaluations == 20000 * 10 and full.evaluations == 20000 * 50
    assert few.variances.shape == full.variances.shape == (50, 2)
    assert ((few.variances / full.variances).log().abs() < 0.06).all()
    g = few.grid[:, None]
    exact = torch.sigmoid(g) / (torch.sigmoid(-g) * GAUSSIAN.scales**2 + torch.sigmoid(g))
    # Γ itself: within the estimates' own error at the few levels (largest near Γ → 1)
    assert (few.gamma_hat - exact).abs().max() < 0.1
    # as many levels as the grid: the plain estimate
    same = analytic_variances(diffusion, data, num_steps=50, diagonal=True, num_levels=50, seed=0)
    assert torch.equal(same.variances, full.variances)
    with pytest.raises(ValueError, match="num_levels"):
        analytic_variances(diffusion, data, num_steps=50, num_levels=1)
