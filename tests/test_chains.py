"""The two chains as Pyro programs: orderings, marginals and per-site KLs (issue 2, items 1–2)."""

import warnings

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.poutine.util import site_is_subsample

from _helpers import LinearDenoiser, independent_step_kl
from pyro_diffusion import GaussianDiffusion, NoiseSchedule, site_name, step_terms
from pyro_diffusion.chains import per_site_kl

EVENT_SHAPES = [(2,), (1, 3, 3)]


def make(event_shape, T=8, **kwargs):
    schedule = NoiseSchedule.linear(T)
    learned = kwargs.get("variance") == "learned"
    return GaussianDiffusion(LinearDenoiser(event_shape, T, learned), schedule, event_shape, **kwargs)


def data(event_shape, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *event_shape), generator=g, dtype=torch.float64)


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
    d = make((2,), T=T)
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64).expand(n, 2)
    with torch.no_grad():
        chain = d.guide(x0, order=order)
    s = d.schedule
    for t in range(1, T + 1):
        x_t = chain[t]
        mean = s.sqrt_alphas_cumprod[t - 1] * x0[0]
        var = 1 - s.alphas_cumprod[t - 1]
        se_mean = (var / n).sqrt()
        assert ((x_t.mean(0) - mean).abs() < 4 * se_mean).all(), (t, x_t.mean(0), mean)
        se_var = var * (2 / (n - 1)) ** 0.5
        assert ((x_t.var(0) - var).abs() < 4 * se_var).all(), (t, x_t.var(0), var)


@pytest.mark.parametrize("event_shape", EVENT_SHAPES)
@pytest.mark.parametrize("variance", ["small", "large", "learned"])
@pytest.mark.parametrize("mean", ["eps", "x0", "mu"])
def test_per_site_kls_equal_independent_closed_form(event_shape, variance, mean):
    d = make(event_shape, variance=variance, mean=mean)
    x0 = data(event_shape)
    guide_trace = poutine.trace(d.guide).get_trace(x0)
    model_trace = poutine.trace(poutine.replay(d.model, trace=guide_trace)).get_trace(x0)
    kls = per_site_kl(model_trace, guide_trace)
    T = d.num_steps
    assert set(kls) == {site_name(t) for t in range(1, T + 1)}
    for t in range(2, T + 1):
        x_t = guide_trace.nodes[site_name(t)]["value"]
        steps = torch.full((x0.shape[0],), t)
        loc, log_var, _ = d.reverse_mean_log_variance(x_t, steps)
        expected = independent_step_kl(d.schedule, x0, x_t, steps, loc, log_var)
        torch.testing.assert_close(kls[site_name(t - 1)], expected, rtol=1e-9, atol=1e-10)
        # the batched bound's step term is the same number for the same x_t
        torch.testing.assert_close(step_terms(d, x0, steps, x_t), expected, rtol=1e-9, atol=1e-10)
    # the prior term at x_T
    abar = d.schedule.alphas_cumprod[-1]
    m = abar.sqrt() * x0
    prior = 0.5 * (m**2 + (1 - abar) - torch.log(1 - abar) - 1).reshape(x0.shape[0], -1).sum(1)
    torch.testing.assert_close(kls[site_name(T)], prior, rtol=1e-10, atol=1e-10)
    # the observed x_0 site is the decoder's log-likelihood, and step_terms at t = 1 matches it
    x1 = guide_trace.nodes[site_name(1)]["value"]
    ones = torch.ones(x0.shape[0], dtype=torch.long)
    model_trace.compute_log_prob()
    torch.testing.assert_close(-model_trace.nodes["x_0"]["log_prob"], step_terms(d, x0, ones, x1))


def test_trace_mean_field_elbo_is_the_sum_of_the_analytic_terms():
    d = make((2,))
    x0 = data((2,))
    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().differentiable_loss(d.model, d.guide, x0)
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(d.guide).get_trace(x0)
    model_trace = poutine.trace(poutine.replay(d.model, trace=guide_trace)).get_trace(x0)
    model_trace.compute_log_prob()
    total = sum(kl.sum() for kl in per_site_kl(model_trace, guide_trace).values())
    total = total - model_trace.nodes["x_0"]["log_prob_sum"]
    torch.testing.assert_close(loss, total)


def _estimates(fn, repeats):
    values = torch.tensor([fn() for _ in range(repeats)], dtype=torch.float64)
    return values.mean().item(), (values.std() / repeats**0.5).item()


def test_trace_elbo_and_trace_mean_field_agree_in_mean():
    d = make((2,), T=6)
    # each loss is a sum over 2,000 independent chains (4 data × 500 copies); repeats give the SE
    x0 = data((2,), n=4).repeat(500, 1)
    with torch.no_grad():
        mc, mc_se = _estimates(lambda: Trace_ELBO().loss(d.model, d.guide, x0), 40)
        mf, mf_se = _estimates(lambda: TraceMeanField_ELBO().loss(d.model, d.guide, x0), 40)
    assert abs(mc - mf) < 4 * (mc_se**2 + mf_se**2) ** 0.5, (mc, mc_se, mf, mf_se)


def test_forward_order_guide_never_gives_a_wrong_analytic_value():
    """Forward-order sites have no analytic KL against the model: TraceMeanField_ELBO falls
    back on log p − log q there (unbiased), and warns under validation."""
    d = make((2,), T=6)
    x0 = data((2,), n=4).repeat(500, 1)

    def forward_guide(x):
        return d.guide(x, order="forward")

    guide_trace = poutine.trace(forward_guide).get_trace(x0)
    model_trace = poutine.trace(poutine.replay(d.model, trace=guide_trace)).get_trace(x0)
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
    assert d.denoiser.weight.grad is not None and torch.isfinite(d.denoiser.weight.grad).all()


def test_model_generates_without_data_and_predictive_works():
    d = make((1, 3, 3))
    x0 = d.model(num_samples=4)
    assert x0.shape == (4, 1, 3, 3)
    predictive = pyro.infer.Predictive(d.model, num_samples=3, return_sites=["x_0", "x_1"])
    out = predictive(num_samples=2)
    assert out["x_0"].shape == (3, 2, 1, 3, 3)


def test_discretized_decoder_chain_runs():
    d = make((1, 3, 3), decoder="discretized", num_levels=17)
    x0 = (torch.randint(0, 17, (4, 1, 3, 3)).double() / 8) - 1
    loss = TraceMeanField_ELBO().loss(d.model, d.guide, x0)
    assert torch.isfinite(torch.tensor(loss))
