"""Conditional samplers on a linear-Gaussian diffusion, whose p_θ(x_0 | y) and p_θ(y) are
known exactly, and (slow) on the trained 2-D mixture model against the data's conditional."""

import math

import pytest
import torch
from inference_helpers import gaussian_conditional, linear_chain_marginal, linear_diffusion

from pyro_diffusion.inference.heuristics import dps_sample, replacement_sample
from pyro_diffusion.inference.nuts import nuts_conditional
from pyro_diffusion.inference.observations import LinearObservation
from pyro_diffusion.inference.smc import twisted_smc
from pyro_diffusion.inference.svi import svi_conditional

OBSERVATION = LinearObservation(torch.tensor([[1.0, 0.5]]), (2,), noise_scale=0.3)
Y = torch.tensor([0.8])


def _exact(diffusion):
    mean, cov = linear_chain_marginal(diffusion)
    return gaussian_conditional(mean, cov, OBSERVATION.matrix.double(), 0.3**2, Y.double())


def test_twisted_smc_matches_the_exact_conditional_and_evidence():
    diffusion = linear_diffusion()
    post_mean, post_cov, log_evidence = _exact(diffusion)
    K = 4000
    result = twisted_smc(diffusion, OBSERVATION, Y, num_particles=K, seed=0)
    T = diffusion.num_steps
    ess_trace, resampled = result.diagnostics["ess"], result.diagnostics["resampled"]
    assert result.method == "twisted_smc" and result.num_steps == T
    assert result.draws.shape == (K, 2) and result.log_weights.shape == (K,)
    assert ess_trace.shape == (T + 1,) and resampled.shape == (T + 1,)
    assert ((ess_trace >= 1 - 1e-6) & (ess_trace <= K + 1e-6)).all()
    assert result.network_calls == T
    w = result.log_weights.exp().double()
    x = result.draws.double()
    ess = 1 / (w**2).sum()
    assert ess.item() == pytest.approx(result.ess)
    mean = (w[:, None] * x).sum(0)
    torch.testing.assert_close(result.mean(), mean)
    se = (post_cov.diagonal() / ess).sqrt()
    assert ((mean - post_mean).abs() < 5 * se).all(), (mean, post_mean, se)
    # the evidence estimate: log-normal-ish error of order 1/√ESS
    log_hat = result.diagnostics["log_evidence"]
    assert abs(log_hat - log_evidence) < 5 / math.sqrt(ess), (log_hat, log_evidence)


def test_twisted_smc_refuses_what_it_cannot_do():
    diffusion = linear_diffusion()
    with pytest.raises(ValueError, match="y"):
        twisted_smc(diffusion, OBSERVATION, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="num_particles"):
        twisted_smc(diffusion, OBSERVATION, Y, num_particles=1)
    with pytest.raises(ValueError, match="event_shape"):
        twisted_smc(diffusion, LinearObservation.denoising((3,), 0.1), torch.zeros(3))
    with pytest.raises(ValueError, match="num_steps"):
        twisted_smc(diffusion, OBSERVATION, Y, num_steps=0)
    with pytest.raises(TypeError, match="diffusion"):
        twisted_smc(torch.nn.Linear(2, 2), OBSERVATION, Y)


def _nuts_check(num_samples, warmup_steps, max_rhat):
    import arviz as az

    from pyro_diffusion.inference.arviz import from_nuts

    diffusion = linear_diffusion(betas=(0.1, 0.3, 0.5))
    post_mean, post_cov, _ = _exact(diffusion)
    result = nuts_conditional(
        diffusion,
        OBSERVATION,
        Y,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=4,
        vectorize_chains=True,
        seed=0,
    )
    assert result.method == "nuts" and result.num_chains == 4
    assert result.draws.shape == (4 * num_samples, 2) and result.chains().shape == (4, num_samples, 2)
    stats = result.diagnostics["sample_stats"]
    assert set(stats) == {"diverging", "lp", "step_size", "tree_size"}
    assert (stats["tree_size"] >= 1).all()
    # every potential evaluation runs the chain's T − 1 steps and the network decoder
    assert result.network_calls == result.diagnostics["potential_evaluations"] * diffusion.num_steps
    summary = az.summary(from_nuts(result), var_names=["x0"])
    assert summary["r_hat"].max() < max_rhat
    mean = result.draws.double().mean(0)
    se = (post_cov.diagonal() / torch.tensor(summary["ess_bulk"].values)).sqrt()
    assert ((mean - post_mean).abs() < 5 * se).all(), (mean, post_mean, se)


def test_nuts_matches_the_exact_conditional():
    _nuts_check(num_samples=30, warmup_steps=30, max_rhat=1.2)


@pytest.mark.slow
def test_nuts_matches_the_exact_conditional_with_small_rhat():
    _nuts_check(num_samples=500, warmup_steps=300, max_rhat=1.01)


def test_nuts_refuses_a_single_draw_by_name():
    with pytest.raises(ValueError, match="num_samples"):
        nuts_conditional(linear_diffusion(), OBSERVATION, Y, num_samples=1, warmup_steps=1, num_chains=1)
    with pytest.raises(ValueError, match="num_samples"):  # Pyro's diagnostics need four draws
        nuts_conditional(linear_diffusion(), OBSERVATION, Y, num_samples=3, warmup_steps=1, num_chains=1)
    with pytest.raises(ValueError, match="warmup_steps"):
        nuts_conditional(linear_diffusion(), OBSERVATION, Y, warmup_steps=-1)


def test_nuts_lp_is_the_log_density_of_each_draw():
    """The recorded lp is −U at the draw: the log joint of the non-centred chain's noises
    and y, recomputed here from the draws' noises with Pyro's trace."""
    import pyro
    from pyro import poutine
    from pyro.infer.reparam import LocScaleReparam

    from pyro_diffusion.inference.nuts import conditional_model
    from pyro_diffusion.inference.prior import DiffusionPrior

    diffusion = linear_diffusion(betas=(0.1, 0.3, 0.5))
    result = nuts_conditional(diffusion, OBSERVATION, Y, num_samples=4, warmup_steps=3, num_chains=1, seed=1)
    prior = DiffusionPrior(diffusion, decoder="gaussian")
    names = prior.site_names("x")
    model = poutine.reparam(conditional_model, config={n: LocScaleReparam(centered=0.0) for n in names})
    noise = result.diagnostics["noise"]
    for i in range(4):
        data = {f"{n}_decentered": noise[f"{n}_decentered"][0, i] for n in names}
        trace = poutine.trace(poutine.condition(model, data=data)).get_trace(prior, OBSERVATION, Y)
        lp = trace.log_prob_sum()  # the chain's own sites are masked Deltas under the reparam
        torch.testing.assert_close(
            result.diagnostics["sample_stats"]["lp"][0, i], lp.detach(), rtol=1e-5, atol=1e-4
        )
    pyro.clear_param_store()


def test_svi_mean_field_recovers_the_exact_marginals_of_a_gaussian_conditional():
    """The exact conditional is Gaussian; the mean-field guide matches its mean and (for the
    coordinate the observation does not couple strongly) roughly its scale."""
    diffusion = linear_diffusion(betas=(0.1, 0.3, 0.5))
    post_mean, post_cov, log_evidence = _exact(diffusion)
    result = svi_conditional(diffusion, OBSERVATION, Y, num_iterations=400, num_particles=32, lr=0.05)
    assert result.method == "svi" and result.num_steps == diffusion.num_steps
    loc, scale = result.diagnostics["loc"], result.diagnostics["scale"]
    losses = result.diagnostics["losses"]
    final = sum(losses[-50:]) / 50
    # −ELBO ≥ −log p(y) up to Monte Carlo noise, and close to it for a near-exact guide
    assert final > -log_evidence - 0.5
    # mean-field KL(q‖p) fit of a Gaussian: the mean is exact; tolerance from the optimizer noise
    assert ((loc.double() - post_mean).abs() < 0.15).all(), (loc, post_mean)
    # and the scales are the conditional precisions' inverse square roots (mean-field optimum)
    precision = torch.linalg.inv(post_cov)
    assert ((scale.double() - precision.diagonal().rsqrt()).abs() < 0.1).all()
    # the draws are draws of q_φ: mean within 4 standard errors of loc
    draws = result.sample(4000)
    assert ((draws.mean(0) - loc).abs() < 4 * scale / 4000**0.5).all()


def test_replacement_pastes_the_observation_and_dps_runs():
    diffusion = linear_diffusion()
    mask = LinearObservation.mask(torch.tensor([True, False]), noise_scale=0.1)
    result = replacement_sample(diffusion, mask, torch.tensor([0.7]), 50)
    samples = result.draws
    assert samples.shape == (50, 2) and torch.all(samples[:, 0] == 0.7)
    assert result.network_calls == diffusion.num_steps and result.method == "replacement"
    # any other A: the observed coordinates of its SVD basis are pasted, so A x_0 = y exactly
    dense = replacement_sample(diffusion, OBSERVATION, Y, 5).draws.double()
    assert torch.allclose(OBSERVATION.mean(dense), Y.double().expand(5, -1), atol=1e-5)
    samples = dps_sample(diffusion, OBSERVATION, Y, 2000, step_size=0.1).draws
    unconditional = diffusion.sample(2000).double()
    # DPS moves the samples toward the data fit: a smaller mean residual than unconditional draws
    residual = (OBSERVATION.mean(samples.double()) - Y).abs().mean()
    residual_prior = (OBSERVATION.mean(unconditional) - Y).abs().mean()
    assert residual < residual_prior
    with pytest.raises(ValueError, match="step_size"):
        dps_sample(diffusion, OBSERVATION, Y, 5, step_size=0.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario",
    [
        (LinearObservation.denoising((2,), noise_scale=0.5), (0.9, 0.4)),
        (LinearObservation.mask(torch.tensor([True, False]), noise_scale=0.1), (2.0,)),
    ],
    ids=["denoising", "inpainting_tail"],
)
@pytest.mark.parametrize("schedule", ["linear", "learned"])
def test_exact_methods_beat_the_heuristics_on_the_mixture(scenario, schedule):
    """On the trained 2-D mixture model (the T = 20 DDPM, or the continuous-time model with a
    learned schedule run on a 20-level grid; trained and cached under runs/ when missing)
    and the denoising and inpainting_tail scenarios of docs/prior_validation.md, twisted SMC
    is closer to the data's exact conditional than replacement and than
    DPS at its better step of (0.1, 0.3), by more than 2 standard errors of the difference.
    (In the inpainting scenario at x_1 = 1 the methods are not separable with 2000 draws: the
    model's own error dominates; see the docs.)"""
    from pyro_diffusion.data import GaussianMixture2D
    from pyro_diffusion.inference.exact import energy_distance, energy_distance_se, mixture_conditional
    from pyro_diffusion.inference.pretrained import load_or_train

    torch.manual_seed(0)
    diffusion = load_or_train("gmm", "elbo", num_steps=20, schedule=schedule)
    assert diffusion.num_steps == 20  # the learned model's default grid: every method runs on it
    observation, y = scenario[0], torch.tensor(scenario[1])
    exact = mixture_conditional(GaussianMixture2D(), observation, y).sample((4000,)).float()
    smc = twisted_smc(diffusion, observation, y, num_particles=2000, seed=0).sample(2000)
    d_smc, se_smc = energy_distance(smc, exact), energy_distance_se(smc, exact)
    candidates = {
        "replacement": [replacement_sample(diffusion, observation, y, 2000).draws],
        "dps": [dps_sample(diffusion, observation, y, 2000, step_size=z).draws for z in (0.1, 0.3)],
    }
    for name, draws in candidates.items():
        scores = [(energy_distance(s, exact), energy_distance_se(s, exact)) for s in draws]
        d, se = min(scores)
        assert d - d_smc > 2 * math.hypot(se, se_smc), (name, d, se, d_smc, se_smc)


def test_nuts_jit_compile_gives_the_same_draws():
    """The JIT-compiled potential is the same function: identical draws up to float rounding,
    the same tree sizes, and the denoiser's parameters trainable again afterwards."""
    diffusion = linear_diffusion(betas=(0.1, 0.3, 0.5))
    runs = [
        nuts_conditional(
            diffusion, OBSERVATION, Y, num_samples=5, warmup_steps=0, num_chains=1, seed=3, jit_compile=jit
        )
        for jit in (False, True)
    ]
    assert torch.allclose(runs[0].draws, runs[1].draws, atol=1e-4), (runs[0].draws, runs[1].draws)
    stats = [run.diagnostics["sample_stats"] for run in runs]
    assert torch.equal(stats[0]["tree_size"], stats[1]["tree_size"])
    torch.testing.assert_close(stats[0]["lp"], stats[1]["lp"], rtol=1e-5, atol=1e-4)
    assert runs[0].network_calls == runs[1].network_calls > 0
    assert all(p.requires_grad for p in diffusion.denoiser.parameters())


@pytest.mark.parametrize("shared", [True, False], ids=["shared-variance", "per-particle-variance"])
def test_smc_final_move_draws_the_exact_gaussian_conditional(shared):
    """The last SMC move draws x_0 ~ p(x_0 | x_1, y) ∝ N(x_0; μ, diag v) N(y; A x_0, σ_y² I)
    by Matheron's rule, and its log normalizer is N(y; A μ, A diag(v) Aᵀ + σ_y² I): 20000 draws
    per group have the closed-form mean (within 4 standard errors) and covariance (within 4
    standard errors of a sample covariance); the normalizer to float precision.  Without a
    shared variance the two groups of particles have different decoders."""
    from pyro_diffusion.inference.smc import _TwistedChain

    diffusion = linear_diffusion()
    chain = _TwistedChain(diffusion, OBSERVATION, Y, diffusion.grid(), "pigdm", None)
    n = 20000
    locs = [torch.tensor([0.2, -0.4]), torch.tensor([-0.5, 0.3])]
    variances = [torch.tensor([0.3, 0.6]), torch.tensor([0.3, 0.6]) if shared else torch.tensor([1.2, 0.1])]
    state = {
        "loc": torch.cat([loc.expand(n, 2) for loc in locs]),
        "scale": torch.cat([v.sqrt().expand(n, 2) for v in variances]),
    }
    torch.manual_seed(0)
    x0, log_norm = chain.final_move(state)
    A, noise_var = OBSERVATION.matrix.double(), 0.3**2
    for g, (loc, var) in enumerate(zip(locs, variances)):
        prior_cov = torch.diag(var.double())
        mean, cov, log_z = gaussian_conditional(loc.double(), prior_cov, A, noise_var, Y.double())
        draws = x0[g * n : (g + 1) * n].double()
        assert ((draws.mean(0) - mean).abs() < 4 * (cov.diagonal() / n).sqrt()).all()
        sample_cov = torch.cov(draws.T)
        se = ((cov**2 + torch.outer(cov.diagonal(), cov.diagonal())) / (n - 1)).sqrt()
        assert ((sample_cov - cov).abs() < 4 * se).all(), (sample_cov, cov)
        torch.testing.assert_close(
            log_norm[g * n : (g + 1) * n].double(),
            torch.full((n,), log_z, dtype=torch.float64),
            rtol=1e-5,
            atol=1e-5,
        )


def test_systematic_resampling_keeps_each_particle_floor_or_ceil_of_its_share():
    from pyro_diffusion.inference.smc import systematic_resample

    torch.manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.ones(50)).sample()
    for _ in range(20):
        index = systematic_resample(probs.log())
        counts = torch.bincount(index, minlength=50).double()
        share = 50 * probs.double()
        assert (
            index.shape == (50,)
            and ((counts >= share.floor() - 1e-9) & (counts <= share.ceil() + 1e-9)).all()
        )


def test_twisted_smc_without_tempering_is_unchanged():
    diffusion = linear_diffusion()
    plain = twisted_smc(diffusion, OBSERVATION, Y, num_particles=64, seed=3)
    # the output of the sampler before tempering was added (same seed)
    assert plain.draws.double().sum().item() == pytest.approx(63.16972351074219, rel=1e-6)
    assert plain.diagnostics["log_evidence"] == pytest.approx(-1.6136809519170412, rel=1e-6)
    assert "temperatures" not in plain.diagnostics
    # exponent 0 (every λ_k = 1) takes the tempered code path and gives the same bits
    flat = twisted_smc(diffusion, OBSERVATION, Y, num_particles=64, seed=3, tempering=0.0)
    assert torch.equal(flat.draws, plain.draws) and torch.equal(flat.log_weights, plain.log_weights)
    assert flat.diagnostics["log_evidence"] == plain.diagnostics["log_evidence"]
    assert torch.equal(flat.diagnostics["temperatures"], torch.ones(diffusion.num_steps, dtype=torch.float64))


@pytest.mark.parametrize("tempering", ["linear", 2.0, "adaptive"])
def test_tempered_twisted_smc_still_targets_the_exact_conditional(tempering):
    from pyro_diffusion.inference.smc import tempering_schedule

    diffusion = linear_diffusion()
    observation = LinearObservation(torch.tensor([[1.0, 0.5]]), (2,), noise_scale=0.1)
    mean_x, cov_x = linear_chain_marginal(diffusion)
    post_mean, post_cov, log_evidence = gaussian_conditional(
        mean_x, cov_x, observation.matrix.double(), 0.1**2, Y.double()
    )
    N = 4000
    # a high adaptive target, so that the bisection does temper on this easy problem
    result = twisted_smc(
        diffusion, observation, Y, num_particles=N, seed=1, tempering=tempering, tempering_ess=0.99
    )
    lambdas = result.diagnostics["temperatures"]
    T = diffusion.num_steps
    assert lambdas.shape == (T,) and (lambdas[:-1] >= lambdas[1:]).all() and lambdas.max() <= 1
    assert (lambdas < 1).any() and result.network_calls == T
    if tempering != "adaptive":
        torch.testing.assert_close(
            lambdas, tempering_schedule(T, 1.0 if tempering == "linear" else tempering)
        )
    w = result.log_weights.exp().double()
    x = result.draws.double()
    ess = 1 / (w**2).sum()
    mean = (w[:, None] * x).sum(0)
    var = (w[:, None] * (x - mean) ** 2).sum(0)
    se = (post_cov.diagonal() / ess).sqrt()
    assert ((mean - post_mean).abs() < 5 * se).all(), (mean, post_mean, se)
    # the variance of a Gaussian sample: relative sd √(2 / ESS)
    assert ((var / post_cov.diagonal() - 1).abs() < 5 * math.sqrt(2 / ess)).all(), (var, post_cov)
    assert abs(result.diagnostics["log_evidence"] - log_evidence) < 5 / math.sqrt(ess)


def test_tempering_refuses_bad_values_by_name():
    from pyro_diffusion.inference.smc import tempering_schedule

    diffusion = linear_diffusion()
    for bad in ("cubic", -1.0, float("nan"), True, [1.0]):
        with pytest.raises(ValueError, match="^tempering: "):
            twisted_smc(diffusion, OBSERVATION, Y, tempering=bad)
    for bad in (0.0, 1.5, "a", True):
        with pytest.raises(ValueError, match="^tempering_ess: "):
            twisted_smc(diffusion, OBSERVATION, Y, tempering="adaptive", tempering_ess=bad)
    with pytest.raises(ValueError, match="^num_steps: "):
        tempering_schedule(0)
    with pytest.raises(ValueError, match="^exponent: "):
        tempering_schedule(4, -1.0)
    torch.testing.assert_close(
        tempering_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    )
