"""The shortcuts of the bound compute what the plain formulas do.

* The KL of a reverse step with the posterior's variance is taken as ½ expm1(γ_t − γ_s)(ε − ε̂)²
  and, for other variances, from the step's coefficients in ε: both must equal the Gaussian KL
  of the two steps' own means and scales.
* ``prior_term`` keeps log σ_T² in float64 (``ForwardMarginal``): in float32 it must match the
  float64 value of KL(q(x_T|x_0) ‖ N(0, I)) to float32 precision even at T = 10, where
  (1 − ᾱ_T) − log(1 − ᾱ_T) − 1 cancels.
* The automatic chunk of ``vlb_terms`` respects both budgets (the numbers it gives do not depend
  on the chunk: ``test_bound_and_losses``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from _helpers import independent_prior_kl
from pyro_diffusion import Diffusion, GaussianDiffusion, LinearGamma, MLPDenoiser, NoiseSchedule, prior_term
from pyro_diffusion.bound import CHUNK_ELEMENTS, _default_chunk


@pytest.mark.parametrize("mean", ["eps", "x0", "v", "mu"])
@pytest.mark.parametrize("variance", ["small", "large", "learned"])
def test_step_kl_shortcuts_equal_the_gaussian_kl(mean, variance):
    torch.manual_seed(0)
    learned = variance == "learned"
    d = Diffusion(
        MLPDenoiser(3, hidden=16, depth=1, learned_variance=learned),
        LinearGamma(-8, 6),
        (3,),
        mean=mean,
        variance=variance,
    ).double()
    x0 = torch.randn(64, 3, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64)
    gamma_t = d.schedule.gamma(t)
    gamma_s = gamma_t - torch.rand(64, dtype=torch.float64) * 2  # steps of any width
    z = d.marginal(x0, gamma_t).rsample()
    q = d.forward_step(x0, z, gamma_s, gamma_t)
    p, _ = d.reverse_step(z, gamma_s, gamma_t)
    exact = kl_divergence(Normal(q.loc, q.scale), Normal(p.loc, p.scale))
    torch.testing.assert_close(kl_divergence(q, p), exact, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("num_steps", [10, 1000])
def test_prior_term_is_accurate_in_float32(num_steps):
    schedule = NoiseSchedule.linear(num_steps)
    d = GaussianDiffusion(MLPDenoiser(3, hidden=8, depth=1), schedule, (3,))
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = independent_prior_kl(schedule.betas, x0)
    assert torch.allclose(prior_term(d, x0), exact, rtol=1e-9)
    single = prior_term(d, x0.float()).double()
    # a few float32 roundings of values of the size of the result: 1e-6 relative
    assert ((single - exact).abs() / exact).max() < 1e-6


def test_default_chunk_respects_rows_and_elements():
    assert _default_chunk(16, 1000, 8192, 2, "cpu") == min(1000, min(8192, CHUNK_ELEMENTS["cpu"] // 2) // 16)
    assert _default_chunk(4, 1000, 8192, 64, "cpu") == CHUNK_ELEMENTS["cpu"] // 64 // 4
    assert _default_chunk(4096, 1000, 8192, 3072, "cpu") == 1  # never less than one step
    assert _default_chunk(16, 1000, 8192, 3072, "cuda") == math.floor(CHUNK_ELEMENTS["cuda"] / 3072 / 16)
    assert _default_chunk(16, 10, 8192, 2, "cpu") == 10  # never more than T
