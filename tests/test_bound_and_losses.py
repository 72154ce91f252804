"""The batched bound, the step-subsampled estimator and L_simple (issue 2, items 2–4)."""

import math

import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from _helpers import LinearDenoiser
from pyro_diffusion import (
    GaussianDiffusion,
    HybridLoss,
    NoiseSchedule,
    SimplifiedLoss,
    StepSubsampledELBO,
    q_sample,
    step_terms,
)


def make(event_shape=(2,), T=10, **kwargs):
    learned = kwargs.get("variance") == "learned"
    return GaussianDiffusion(
        LinearDenoiser(event_shape, T, learned), NoiseSchedule.linear(T), event_shape, **kwargs
    )


def data(n=4, event_shape=(2,), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *event_shape), generator=g, dtype=torch.float64)


def _mean_se(values):
    values = torch.as_tensor(values, dtype=torch.float64)
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def test_vlb_terms_columns_and_sum_match_the_sequential_elbo():
    d = make()
    x0 = data()
    copies = 300
    big = x0.repeat(copies, 1)
    terms = d.vlb_terms(big)
    T = d.num_steps
    assert terms.shape == (big.shape[0], T + 1) and terms.dtype == torch.float64
    # column T is the analytic prior KL: the same for every copy of a datum
    torch.testing.assert_close(terms[:, T].reshape(copies, 4), terms[:4, T].expand(copies, 4))
    per_copy_sum = terms.sum(1).reshape(copies, 4).sum(1)  # summed over the 4 data
    batched, batched_se = _mean_se(per_copy_sum)
    with torch.no_grad():
        sequential = [TraceMeanField_ELBO().loss(d.model, d.guide, big) / copies for _ in range(12)]
    seq, seq_se = _mean_se(sequential)
    assert abs(batched - seq) < 4 * math.hypot(batched_se, seq_se), (batched, batched_se, seq, seq_se)
    # nll is the row sum in bits per dimension
    torch.testing.assert_close(d.nll(x0, steps_per_call=3).shape, torch.Size([4]))


def test_vlb_terms_does_not_depend_on_the_chunking():
    d = make(T=7)
    big = data().repeat(300, 1)
    sums = {}
    for chunk in (1, 3, 7):
        values = [d.vlb_terms(big, steps_per_call=chunk).sum().item() / 300 for _ in range(6)]
        sums[chunk] = _mean_se(values)
    (a, a_se), (b, b_se), (c, c_se) = sums.values()
    assert abs(a - c) < 4 * math.hypot(a_se, c_se) and abs(b - c) < 4 * math.hypot(b_se, c_se)


@pytest.mark.parametrize("importance", [False, True])
def test_step_subsampled_estimator_is_unbiased(importance):
    d = make(T=10)
    x0 = data()
    copies = 400
    big = x0.repeat(copies, 1)
    loss = StepSubsampledELBO(importance=importance, warmup=3)
    with torch.no_grad():
        if importance:  # learn the importance weights first; then they are far from uniform
            for _ in range(10):
                loss.loss(d.model, d.guide, big)
            probs = loss.step_probabilities(10, big.device)
            assert (probs.max() / probs.min()).item() > 2
        estimates = [loss.loss(d.model, d.guide, big) / copies for _ in range(30)]
        full = [d.vlb_terms(big).sum().item() / copies for _ in range(10)]
    est, est_se = _mean_se(estimates)
    ref, ref_se = _mean_se(full)
    assert abs(est - ref) < 4 * math.hypot(est_se, ref_se), (est, est_se, ref, ref_se)


def test_importance_weights_follow_root_mean_square_terms():
    loss = StepSubsampledELBO(importance=True, warmup=1, decay=0.0, uniform_mix=1e-3)
    t = torch.tensor([1, 2, 3, 3])
    loss._record(t, torch.tensor([1.0, 2.0, 3.0, 5.0]), 3)
    probs = loss.step_probabilities(3, "cpu", torch.float64)
    rms = torch.tensor([1.0, 2.0, math.sqrt((9 + 25) / 2)], dtype=torch.float64)
    expected = 0.999 * rms / rms.sum() + 1e-3 / 3
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_simplified_loss_is_the_reweighted_step_kl(variance):
    """With ε-prediction and fixed σ_t: ℓ_t = λ_t ‖ε − ε_θ‖² + C_t for t ≥ 2, with
    λ_t = β_t² / (2 σ_t² α_t (1 − ᾱ_t)) and C_t = ½ D (log σ_t²/β̃_t + β̃_t/σ_t² − 1)."""
    T, D = 10, 2
    d = make(T=T, variance=variance)
    s = d.schedule
    x0 = data(n=T - 1)
    t = torch.arange(2, T + 1)
    x_t, noise = q_sample(s, x0, t)
    terms = step_terms(d, x0, t, x_t)
    with torch.no_grad():
        eps = d.predict_eps(x_t, t)
    squared_error = ((noise - eps) ** 2).sum(1)
    i = t - 1
    sigma2 = s.posterior_variance[i] if variance == "small" else s.betas[i]
    lam = s.betas[i] ** 2 / (2 * sigma2 * s.alphas[i] * (1 - s.alphas_cumprod[i]))
    const = 0.5 * D * (torch.log(sigma2 / s.posterior_variance[i]) + s.posterior_variance[i] / sigma2 - 1)
    torch.testing.assert_close(terms, lam * squared_error + const, rtol=1e-9, atol=1e-9)
    # so Σ_t (ℓ_t − C_t)/λ_t is the L_simple sum: the objectives differ only in step weights
    torch.testing.assert_close(((terms - const) / lam).sum(), squared_error.sum(), rtol=1e-9, atol=1e-9)
    if variance == "small":
        assert torch.allclose(const, torch.zeros_like(const), atol=1e-12)


def test_simplified_loss_estimates_the_mean_squared_error_over_uniform_steps():
    T = 5
    d = make(T=T)
    x0 = data(n=2).repeat(1000, 1)
    with torch.no_grad():
        values = [SimplifiedLoss().loss(d.model, d.guide, x0) / x0.shape[0] for _ in range(20)]
        exact = []
        for _ in range(20):
            total = 0.0
            for step in range(1, T + 1):
                t = torch.full((x0.shape[0],), step)
                x_t, noise = q_sample(d.schedule, x0, t)
                total += ((noise - d.predict_eps(x_t, t)) ** 2).sum().item() / T
            exact.append(total / x0.shape[0])
    a, a_se = _mean_se(values)
    b, b_se = _mean_se(exact)
    assert abs(a - b) < 4 * math.hypot(a_se, b_se)


def test_hybrid_vlb_term_trains_only_the_variance():
    d = make(variance="learned")
    x0 = data()
    D = 2  # rows :D of the output layer make the mean, rows D: the variance interpolation
    pyro.set_rng_seed(0)
    HybridLoss(vlb_weight=1.0).differentiable_loss(d.model, d.guide, x0).backward()
    hybrid = d.denoiser.weight.grad.clone()
    d.zero_grad()
    pyro.set_rng_seed(0)  # same t and ε
    SimplifiedLoss().differentiable_loss(d.model, d.guide, x0).backward()
    simple = d.denoiser.weight.grad.clone()
    torch.testing.assert_close(hybrid[:D], simple[:D])  # the vlb term leaves the mean alone
    assert simple[D:].abs().sum() == 0 and hybrid[D:].abs().sum() > 0


def test_losses_refuse_foreign_programs():
    d = make()
    with pytest.raises(TypeError, match="model"):
        StepSubsampledELBO().loss(lambda x: None, d.guide, data())
    other = make()
    with pytest.raises(ValueError, match="same GaussianDiffusion"):
        StepSubsampledELBO().loss(d.model, other.guide, data())
