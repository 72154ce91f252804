"""The batched bound, the one-step estimator (DiffusionELBO) and L_simple: exact identities on
the same draws, and unbiasedness within standard errors."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from _helpers import assert_agree, ddpm_tables, fix_marginal_draws, linear_denoiser, mean_and_se
from pyro_diffusion import (
    Diffusion,
    DiffusionELBO,
    GaussianDiffusion,
    HybridLoss,
    NoiseSchedule,
    SimplifiedLoss,
    StepDraw,
    site_name,
)
from pyro_diffusion.chains import per_site_kl
from pyro_diffusion.losses import trace_terms


def make(event_shape=(2,), T=10, **kwargs):
    learned = kwargs.get("variance") == "learned"
    schedule = NoiseSchedule.linear(T)
    return GaussianDiffusion(linear_denoiser(event_shape, schedule, learned), schedule, event_shape, **kwargs)


def data(n=4, event_shape=(2,), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *event_shape), generator=g, dtype=torch.float64)


def chain_draws(d, x0, seed=3):
    """The forward chain's x_t (t = 1..T) and both traces of one TraceMeanField_ELBO evaluation."""
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(d.guide).get_trace(x0)
    model_trace = poutine.trace(poutine.replay(d.model, trace=guide_trace)).get_trace(x0)
    values = {t: guide_trace.nodes[site_name(t)]["value"] for t in range(1, d.num_steps + 1)}
    return values, model_trace, guide_trace


def with_draw(loss, make_draw):
    """``loss`` making its step draws with ``make_draw`` (fixed steps)."""
    loss.make_draw = make_draw
    return loss


@pytest.mark.parametrize("decoder", ["plain", "network", "ddpm"])
def test_vlb_terms_columns_are_trace_mean_field_on_the_same_draws(decoder, monkeypatch):
    """Column by column, vlb_terms at the chain's own x_t is TraceMeanField_ELBO's
    decomposition of the full chain: the sum is its loss exactly."""
    T = 7
    schedule = NoiseSchedule.linear(T)
    d = Diffusion(linear_denoiser((2,), schedule), schedule, (2,), decoder=decoder, variance="large")
    x0 = data()
    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().loss(d.model, d.guide, x0)
    values, model_trace, guide_trace = chain_draws(d, x0, seed=3)
    kls = per_site_kl(model_trace, guide_trace)
    model_trace.compute_log_prob()
    fix_marginal_draws(monkeypatch, d.grid(), values)
    for chunk in (1, 3, T):  # the same numbers whatever the chunking
        terms = d.vlb_terms(x0, steps_per_call=chunk)
        assert terms.shape == (4, T + 1) and terms.dtype == torch.float64
        torch.testing.assert_close(terms[:, 0], -model_trace.nodes["x_0"]["log_prob"], rtol=1e-12, atol=1e-12)
        for t in range(2, T + 1):
            torch.testing.assert_close(terms[:, t - 1], kls[site_name(t - 1)], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(terms[:, T], kls[site_name(T)], rtol=1e-12, atol=1e-12)
        assert terms.sum().item() == pytest.approx(loss, rel=1e-12)
    bits = d.nll(x0)  # the row sums in bits per dimension
    torch.testing.assert_close(bits, terms.sum(1) / (2 * math.log(2)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decoder", ["plain", "ddpm"])
def test_one_step_estimate_is_the_weighted_column_on_the_same_draws(decoder, monkeypatch):
    """With every datum's step fixed at t and the same x_t: DiffusionELBO = L_T + n·ℓ_t (+ the
    decoder term, computed for every datum when it does not use the network), exactly."""
    T = 6
    schedule = NoiseSchedule.linear(T)
    d = Diffusion(linear_denoiser((2,), schedule), schedule, (2,), decoder=decoder)
    x0 = data()
    values, _, _ = chain_draws(d, x0)
    fix_marginal_draws(monkeypatch, d.grid(), values)
    terms = d.vlb_terms(x0)
    first = 1 if decoder == "ddpm" else 2
    n = T - first + 1
    for t in range(first, T + 1):
        index = torch.full((4,), t)
        loss = with_draw(DiffusionELBO(), lambda index=index: StepDraw(index=index))
        expected = terms[:, T] + n * terms[:, t - 1]
        if decoder == "plain":
            expected = expected + terms[:, 0]
        assert loss.loss(d.model, d.guide, x0) == pytest.approx(expected.sum().item(), rel=1e-12)


def test_vlb_terms_sum_agrees_with_the_sequential_elbo_in_mean():
    d = make()
    x0 = data()
    copies = 300
    big = x0.repeat(copies, 1)
    terms = d.vlb_terms(big)
    T = d.num_steps
    # column T is the analytic prior KL: the same for every copy of a datum
    torch.testing.assert_close(terms[:, T].reshape(copies, 4), terms[:4, T].expand(copies, 4))
    batched = mean_and_se(terms.sum(1).reshape(copies, 4).sum(1))
    with torch.no_grad():
        sequential = mean_and_se(
            [TraceMeanField_ELBO().loss(d.model, d.guide, big) / copies for _ in range(12)]
        )
    assert_agree(batched, sequential)


@pytest.mark.parametrize("times", ["uniform", "low-discrepancy", "importance"])
def test_one_step_estimator_is_unbiased(times):
    d = make(T=10)
    x0 = data()
    copies = 400
    big = x0.repeat(copies, 1)
    loss = DiffusionELBO(times=times, warmup=3)
    with torch.no_grad():
        if times == "importance":  # learn the importance weights first; then they are far from uniform
            for _ in range(10):
                loss.loss(d.model, d.guide, big)
            probs = loss.step_probabilities(10, big.device)
            assert (probs.max() / probs.min()).item() > 2
        estimates = mean_and_se([loss.loss(d.model, d.guide, big) / copies for _ in range(30)])
        full = mean_and_se([d.vlb_terms(big).sum().item() / copies for _ in range(10)])
    assert_agree(estimates, full, what=times)


def test_one_step_estimator_is_unbiased_for_a_plain_decoder_on_a_respaced_grid():
    """num_steps=K: the estimate of the K-level bound (steps 2..K, the decoder every datum)."""
    schedule = NoiseSchedule.linear(100)
    d = Diffusion(linear_denoiser((2,), schedule), schedule, (2,), decoder="plain")
    big = data().repeat(400, 1)
    loss = DiffusionELBO(num_steps=10)
    with torch.no_grad():
        estimates = mean_and_se([loss.loss(d.model, d.guide, big) / 400 for _ in range(30)])
        full = mean_and_se([d.vlb_terms(big, num_steps=10).sum().item() / 400 for _ in range(10)])
    assert_agree(estimates, full)


def test_importance_weights_follow_root_mean_square_terms():
    loss = DiffusionELBO(times="importance", warmup=1, decay=0.0, uniform_mix=1e-3)
    offsets = torch.tensor([0, 1, 2, 2])
    loss._record(offsets, torch.tensor([1.0, 2.0, 3.0, 5.0]), 3)
    probs = loss.step_probabilities(3, "cpu", torch.float64)
    rms = torch.tensor([1.0, 2.0, math.sqrt((9 + 25) / 2)], dtype=torch.float64)
    expected = 0.999 * rms / rms.sum() + 1e-3 / 3
    torch.testing.assert_close(probs, expected)
    # before every step has been seen `warmup` times: uniform
    fresh = DiffusionELBO(times="importance", warmup=2)
    fresh._record(offsets, torch.ones(4), 3)
    torch.testing.assert_close(
        fresh.step_probabilities(3, "cpu", torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    )


def test_importance_sampler_records_each_steps_own_term():
    """The history holds ℓ_t (not ℓ_t / r(t)) of the step drawn: with steps fixed, its second
    moments are the squares of the unweighted KL terms."""
    d = make(T=5)
    x0 = data(n=5)
    loss = DiffusionELBO(times="importance", warmup=1, decay=0.0)
    index = torch.tensor([1, 2, 3, 4, 5])
    with_draw(loss, lambda: StepDraw("importance", index=index))
    pyro.set_rng_seed(0)
    model_trace, guide_trace, draw = loss.traces(d.model, d.guide, (x0,), {})
    terms = trace_terms(model_trace, guide_trace)
    own = torch.where(index == 1, terms["x_0"], terms["x_s"]) / 5  # both carry the weight n = 5
    loss.per_datum(model_trace, guide_trace, draw)
    torch.testing.assert_close(loss._second_moment, own.double() ** 2)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_simplified_loss_is_the_reweighted_step_kl(variance):
    """With ε-prediction and fixed σ_t: ℓ_t = λ_t ‖ε − ε_θ‖² + C_t for t ≥ 2, with
    λ_t = β_t² / (2 σ_t² α_t (1 − ᾱ_t)) and C_t = ½ D (log σ_t²/β̃_t + β̃_t/σ_t² − 1): L_simple
    and the bound read from the same programs and draws differ only in the steps' weights."""
    T, D = 10, 2
    d = make(T=T, variance=variance)
    k = ddpm_tables(d.schedule.betas)
    x0 = data(n=T - 1)
    t = torch.arange(2, T + 1)
    draws = {}
    for name, loss in (("simple", SimplifiedLoss()), ("elbo", DiffusionELBO())):
        pyro.set_rng_seed(5)  # the same x_t for both
        model_trace, guide_trace, draw = with_draw(loss, lambda: StepDraw(index=t)).traces(
            d.model, d.guide, (x0,), {}
        )
        draws[name] = (loss.per_datum(model_trace, guide_trace, draw), trace_terms(model_trace, guide_trace))
    squared_error = draws["simple"][0]
    terms = draws["elbo"][1]["x_s"] / T  # ℓ_t (the site carries the weight n = T)
    i = t - 1
    sigma2 = k["tilde"][i] if variance == "small" else k["betas"][i]
    lam = k["betas"][i] ** 2 / (2 * sigma2 * k["alphas"][i] * (1 - k["abar"][i]))
    const = 0.5 * D * (torch.log(sigma2 / k["tilde"][i]) + k["tilde"][i] / sigma2 - 1)
    torch.testing.assert_close(terms, lam * squared_error + const, rtol=1e-9, atol=1e-9)
    # so Σ_t (ℓ_t − C_t)/λ_t is the L_simple sum: the objectives differ only in step weights
    torch.testing.assert_close(((terms - const) / lam).sum(), squared_error.sum(), rtol=1e-9, atol=1e-9)
    if variance == "small":
        assert torch.allclose(const, torch.zeros_like(const), atol=1e-12)


def test_simplified_loss_estimates_the_mean_squared_error_over_uniform_steps():
    T = 5
    d = make(T=T)
    x0 = data(n=2).repeat(1000, 1)
    grid = d.grid()
    with torch.no_grad():
        values = [SimplifiedLoss().loss(d.model, d.guide, x0) / x0.shape[0] for _ in range(20)]
        exact = []
        for _ in range(20):
            total = 0.0
            for step in range(1, T + 1):  # the network decodes too: steps 1..T
                z = d.marginal(x0, grid[step - 1]).rsample()
                eps = d.noise_of(x0, z, grid[step - 1])
                eps_hat = d.predict(z, grid[step - 1])[0].eps
                total += ((eps - eps_hat) ** 2).sum().item() / T
            exact.append(total / x0.shape[0])
    assert_agree(mean_and_se(values), mean_and_se(exact))


def test_hybrid_vlb_term_trains_only_the_variance():
    d = make(variance="learned")
    x0 = data()
    weight = d.denoiser.network.weight
    D = 2  # rows :D of the output layer make the mean, rows D: the variance interpolation
    pyro.set_rng_seed(0)
    HybridLoss(vlb_weight=1.0).differentiable_loss(d.model, d.guide, x0).backward()
    hybrid = weight.grad.clone()
    d.zero_grad()
    pyro.set_rng_seed(0)  # same t and ε
    SimplifiedLoss().differentiable_loss(d.model, d.guide, x0).backward()
    simple = weight.grad.clone()
    torch.testing.assert_close(hybrid[:D], simple[:D])  # the vlb term leaves the mean alone
    assert simple[D:].abs().sum() == 0 and hybrid[D:].abs().sum() > 0


def test_losses_refuse_foreign_programs():
    d = make()
    x0 = data()
    with pytest.raises(ValueError, match="model, guide"):
        DiffusionELBO().loss(lambda x0, **kwargs: None, d.guide, x0)  # no sites at all

    def partial_guide(x0, **kwargs):  # the guide without the prior's site
        return poutine.block(d.guide, hide=["x_T"])(x0, **kwargs)

    with pytest.raises(ValueError, match="model, guide"):
        DiffusionELBO().loss(d.model, partial_guide, x0)
    with pytest.raises(TypeError, match="steps"):
        DiffusionELBO().loss(lambda x0: None, d.guide, x0)  # programs must take steps=
    with pytest.raises(ValueError, match="x0"):
        SimplifiedLoss().loss(d.model, d.guide)


def test_masked_decoder_terms_keep_the_gradients_finite():
    """Data whose step is not the decoder's carry a masked-out decoder term; at high noise the
    network's x̂ is far from the data, where a float32 discretized log-mass has NaN gradients.
    The masked terms must not reach the weights."""
    import pyro
    from pyro.infer import SVI
    from pyro.optim import Adam

    from pyro_diffusion import DiffusionELBO, GaussianDiffusion, MLPDenoiser, NoiseSchedule

    torch.manual_seed(0)
    levels = torch.linspace(-1, 1, 17)
    x0 = levels[torch.randint(17, (128, 1, 8, 8))]
    d = GaussianDiffusion(
        MLPDenoiser((1, 8, 8), hidden=64),
        NoiseSchedule.linear(1000),
        (1, 8, 8),
        decoder="discretized",
        num_levels=17,
    )
    with torch.no_grad():  # a network whose x̂ is far off at every level
        d.denoiser.output[-1].bias.fill_(30.0)
    svi = SVI(d.model, d.guide, Adam({"lr": 1e-3}), DiffusionELBO())
    for _ in range(5):
        svi.step(x0)
    pyro.clear_param_store()
    assert all(torch.isfinite(p).all() for p in d.parameters())
