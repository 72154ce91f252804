"""The two chains as Pyro programs: orderings, marginals and per-site KLs against the DDPM
closed forms written from the βs alone."""

import warnings

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from _helpers import (
    ddpm_tables,
    gaussian_log_prob,
    independent_decoder,
    independent_prior_kl,
    independent_reverse,
    independent_step_kl,
    linear_denoiser,
    mean_and_se,
)
from pyro_diffusion import GaussianDiffusion, NoiseSchedule, site_name
from pyro_diffusion.bound import step_terms
from pyro_diffusion.chains import per_site_kl

EVENT_SHAPES = [(2,), (1, 3, 3)]
BETAS = torch.linspace(0.02, 0.3, 8, dtype=torch.float64)


def make(event_shape, betas=BETAS, **kwargs):
    schedule = NoiseSchedule(betas)
    learned = kwargs.get("variance") == "learned"
    return GaussianDiffusion(linear_denoiser(event_shape, schedule, learned), schedule, event_shape, **kwargs)


def data(event_shape, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *event_shape), generator=g, dtype=torch.float64)


def traces(d, x0, **kwargs):
    guide_trace = poutine.trace(d.guide).get_trace(x0, **kwargs)
    model_trace = poutine.trace(poutine.replay(d.model, trace=guide_trace)).get_trace(x0)
    return model_trace, guide_trace


@pytest.mark.parametrize("event_shape", EVENT_SHAPES)
def test_log_q_identical_under_both_orderings(event_shape):
    d = make(event_shape)
    x0 = data(event_shape)
    for sampling_order, scoring_order in [("posterior", "forward"), ("forward", "posterior")]:
        trace = poutine.trace(d.guide).get_trace(x0, order=sampling_order)
        values = {
            name: site["value"]
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)
        }
        assert set(values) == {site_name(t) for t in range(1, d.num_steps + 1)}
        rescored = poutine.trace(poutine.condition(d.guide, data=values)).get_trace(x0, order=scoring_order)
        log_q, log_q_other = trace.log_prob_sum(), rescored.log_prob_sum()
        assert log_q.dtype == torch.float64
        torch.testing.assert_close(log_q, log_q_other, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("order", ["posterior", "forward"])
def test_chain_samples_match_closed_form_marginals(order):
    T, n = 6, 20_000
    betas = BETAS[:T]
    d = make((2,), betas=betas)
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64).expand(n, 2)
    with torch.no_grad():
        chain = d.guide(x0, order=order)
    abar = ddpm_tables(betas)["abar"]
    for t in range(1, T + 1):
        x_t = chain[t]
        mean = abar[t - 1].sqrt() * x0[0]
        var = 1 - abar[t - 1]
        se_mean = (var / n).sqrt()
        assert ((x_t.mean(0) - mean).abs() < 4 * se_mean).all(), (t, x_t.mean(0), mean)
        se_var = var * (2 / (n - 1)) ** 0.5
        assert ((x_t.var(0) - var).abs() < 4 * se_var).all(), (t, x_t.var(0), var)


@pytest.mark.parametrize("event_shape", EVENT_SHAPES)
@pytest.mark.parametrize("variance", ["small", "large", "learned"])
@pytest.mark.parametrize("mean", ["eps", "x0", "mu"])
def test_per_site_kls_equal_independent_closed_form(event_shape, variance, mean):
    """Every site of TraceMeanField_ELBO's decomposition equals DDPM's closed form, with the
    reverse mean and variance rebuilt from the raw step-indexed network output."""
    d = make(event_shape, variance=variance, mean=mean)
    x0 = data(event_shape)
    model_trace, guide_trace = traces(d, x0)
    kls = per_site_kl(model_trace, guide_trace)
    T = d.num_steps
    grid = d.grid()
    net = d.denoiser.network  # the step-indexed network, called by step here
    assert set(kls) == {site_name(t) for t in range(1, T + 1)}

    def raw(x, t):
        out = net(x, t)
        return out.chunk(2, dim=1) if variance == "learned" else (out, None)

    for t in range(2, T + 1):
        x_t = guide_trace.nodes[site_name(t)]["value"]
        steps = torch.full((x0.shape[0],), t)
        output, variance_output = raw(x_t, steps)
        loc, log_var = independent_reverse(BETAS, mean, variance, output, x_t, steps, variance_output)
        expected = independent_step_kl(BETAS, x0, x_t, steps, loc, log_var)
        torch.testing.assert_close(kls[site_name(t - 1)], expected, rtol=1e-9, atol=1e-10)
        # the bound's step term is the same number for the same x_t
        pyro.set_rng_seed(t)
        z_t = d.marginal(x0, grid[t - 1]).rsample()
        pyro.set_rng_seed(t)
        direct = step_terms(d, x0, grid[t - 2], grid[t - 1])
        again = kl_divergence(
            d.forward_step(x0, z_t, grid[t - 2], grid[t - 1]),
            d.reverse_step(z_t, grid[t - 2], grid[t - 1])[0],
        )
        torch.testing.assert_close(direct, again.reshape(x0.shape[0], -1).sum(1), rtol=1e-12, atol=1e-12)
    # the prior term at x_T
    torch.testing.assert_close(kls[site_name(T)], independent_prior_kl(BETAS, x0), rtol=1e-10, atol=1e-10)
    # the observed x_0 site is the decoder's log-likelihood
    x_1 = guide_trace.nodes[site_name(1)]["value"]
    output, variance_output = raw(x_1, torch.ones(x0.shape[0], dtype=torch.long))
    loc, log_var = independent_decoder(BETAS, mean, variance, output, x_1, variance_output)
    model_trace.compute_log_prob()
    torch.testing.assert_close(model_trace.nodes["x_0"]["log_prob"], gaussian_log_prob(x0, loc, log_var))


def test_trace_mean_field_elbo_is_the_sum_of_the_analytic_terms():
    d = make((2,))
    x0 = data((2,))
    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().differentiable_loss(d.model, d.guide, x0)
    pyro.set_rng_seed(3)
    model_trace, guide_trace = traces(d, x0)
    model_trace.compute_log_prob()
    total = sum(kl.sum() for kl in per_site_kl(model_trace, guide_trace).values())
    total = total - model_trace.nodes["x_0"]["log_prob_sum"]
    torch.testing.assert_close(loss, total, rtol=1e-12, atol=1e-12)


def _estimates(fn, repeats):
    return mean_and_se([fn() for _ in range(repeats)])


def test_trace_elbo_and_trace_mean_field_agree_in_mean():
    d = make((2,), betas=BETAS[:6])
    # each loss is a sum over 2,000 independent chains (4 data × 500 copies); repeats give the SE
    x0 = data((2,), n=4).repeat(500, 1)
    with torch.no_grad():
        mc, mc_se = _estimates(lambda: Trace_ELBO().loss(d.model, d.guide, x0), 40)
        mf, mf_se = _estimates(lambda: TraceMeanField_ELBO().loss(d.model, d.guide, x0), 40)
    assert abs(mc - mf) < 4 * (mc_se**2 + mf_se**2) ** 0.5, (mc, mc_se, mf, mf_se)


def test_forward_order_guide_never_gives_a_wrong_analytic_value():
    """Forward-order sites have no analytic KL against the model (x_1 included: its q(x_1|x_0)
    does not condition on the x_2 that the model's p(x_1|x_2) does): TraceMeanField_ELBO falls
    back on log p − log q there (unbiased), and warns under validation."""
    d = make((2,), betas=BETAS[:6])
    x0 = data((2,), n=4).repeat(500, 1)

    def forward_guide(x, **kwargs):
        return d.guide(x, order="forward", **kwargs)

    model_trace, guide_trace = traces(d, x0, order="forward")
    assert per_site_kl(model_trace, guide_trace) == {}  # every site falls back on Monte Carlo
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TraceMeanField_ELBO().loss(d.model, forward_guide, x0)
    assert any("mean field" in str(w.message) for w in caught)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fwd, fwd_se = _estimates(lambda: TraceMeanField_ELBO().loss(d.model, forward_guide, x0), 40)
        post, post_se = _estimates(lambda: TraceMeanField_ELBO().loss(d.model, d.guide, x0), 40)
    assert abs(fwd - post) < 4 * (fwd_se**2 + post_se**2) ** 0.5, (fwd, fwd_se, post, post_se)


def test_chains_as_modules_give_an_elbo_module_over_the_denoiser_parameters():
    d = make((2,))
    elbo_module = TraceMeanField_ELBO()(d.model_module(), d.guide_module())
    assert isinstance(elbo_module, ELBOModule)
    assert {id(p) for p in elbo_module.parameters()} == {id(p) for p in d.denoiser.parameters()}
    assert list(d.guide_module().parameters()) == []
    loss = elbo_module(data((2,)))
    loss.backward()
    weight = d.denoiser.network.weight
    assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_model_generates_without_data_and_predictive_works():
    d = make((1, 3, 3))
    x0 = d.model(num_samples=4)
    assert x0.shape == (4, 1, 3, 3)
    predictive = pyro.infer.Predictive(d.model, num_samples=3, return_sites=["x_0", "x_1"])
    out = predictive(num_samples=2)
    assert out["x_0"].shape == (3, 2, 1, 3, 3) and out["x_1"].shape == (3, 2, 1, 3, 3)


def test_model_and_guide_on_a_respaced_grid():
    """``num_steps=K`` runs both chains on K native levels (sites x_K … x_1)."""
    d = GaussianDiffusion(
        linear_denoiser((2,), NoiseSchedule.linear(100)), NoiseSchedule.linear(100), (2,), variance="small"
    )
    x0 = data((2,))
    guide_trace = poutine.trace(d.guide).get_trace(x0, num_steps=10)
    model_trace = poutine.trace(poutine.replay(d.model, trace=guide_trace)).get_trace(x0, num_steps=10)
    latent = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
    assert latent == [site_name(t) for t in range(10, 0, -1)]
    loss = TraceMeanField_ELBO().loss(d.model, d.guide, x0, num_steps=10)
    assert torch.isfinite(torch.tensor(loss))
    kls = per_site_kl(model_trace, guide_trace)
    grid = d.grid(10)
    x_t = guide_trace.nodes["x_10"]["value"]
    expected = kl_divergence(
        d.forward_step(x0, x_t, grid[8], grid[9]), d.reverse_step(x_t, grid[8], grid[9])[0]
    )
    torch.testing.assert_close(kls["x_9"], expected.sum(-1))


def test_discretized_decoder_site_is_the_gaussian_mass_of_the_bin():
    """The observed x_0 of a K-level decoder: log(Φ((x + h − μ)/σ) − Φ((x − h − μ)/σ)) with
    h = 1/(K − 1), the edge bins open, at DDPM's decoder mean and variance."""
    d = make((1, 3, 3), decoder="discretized", num_levels=17)
    x0 = (torch.randint(0, 17, (4, 1, 3, 3), generator=torch.Generator().manual_seed(0)).double() / 8) - 1
    loss = TraceMeanField_ELBO().loss(d.model, d.guide, x0)
    assert torch.isfinite(torch.tensor(loss))
    model_trace, guide_trace = traces(d, x0)
    model_trace.compute_log_prob()
    x_1 = guide_trace.nodes["x_1"]["value"]
    output = d.denoiser.network(x_1, torch.ones(4, dtype=torch.long))
    loc, log_var = independent_decoder(BETAS, "eps", "large", output, x_1)
    normal = torch.distributions.Normal(loc, (0.5 * log_var).exp())
    h = 1 / 16
    upper = torch.where(x0 > 1 - h / 2, torch.ones_like(x0), normal.cdf(x0 + h))
    lower = torch.where(x0 < -1 + h / 2, torch.zeros_like(x0), normal.cdf(x0 - h))
    expected = torch.log(upper - lower).reshape(4, -1).sum(1)
    torch.testing.assert_close(model_trace.nodes["x_0"]["log_prob"], expected, rtol=1e-8, atol=1e-8)
    assert (model_trace.nodes["x_0"]["log_prob"] <= 0).all()  # a log-probability mass
