"""The performance paths of bound.py, losses.py and sampling.py compute what the plain paths do.

* ``ancestral_sample`` with fixed variances uses per-step coefficient tables (μ_θ affine in x_t
  and the network output); with the same x_T and seed it must give the draws of the generic
  path through ``reverse_mean_log_variance`` up to float32 rounding.
* ``prior_term`` takes ᾱ_T as a 0-d entry with the constant in float64: in float32 it must
  match the float64 value of KL(q(x_T|x_0) ‖ N(0, I)) to float32 precision even at T = 10,
  where (1 − ᾱ_T) − log(1 − ᾱ_T) − 1 cancels.
* The automatic chunk of ``vlb_terms`` respects both budgets and gives the same bound as one
  step per call (same draws are not available across chunkings, so the check is on the
  deterministic prior column and on shapes; the statistics are the core tests' business).
"""

from __future__ import annotations

import math

import pytest
import torch

import pyro_diffusion.sampling as sampling
from pyro_diffusion import GaussianDiffusion, MLPDenoiser, NoiseSchedule, ancestral_sample, prior_term
from pyro_diffusion.bound import CHUNK_ELEMENTS, _default_chunk


@pytest.mark.parametrize("mean", ["eps", "x0", "mu"])
@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("decoder", ["gaussian", "discretized"])
def test_tabulated_sampling_matches_the_generic_path(mean, variance, decoder, monkeypatch):
    torch.manual_seed(0)
    net = MLPDenoiser(2, hidden=16, depth=1)
    diffusion = GaussianDiffusion(
        net,
        NoiseSchedule.linear(20),
        (2,),
        mean=mean,
        variance=variance,
        decoder=decoder,
        num_levels=17 if decoder == "discretized" else None,
    )
    x_T = torch.randn(32, 2)
    torch.manual_seed(1)
    fast, fast_chain = ancestral_sample(diffusion, 32, x_T=x_T, return_chain=True, denoise_last=False)
    monkeypatch.setattr(sampling, "_step_tables", lambda *args: None)
    torch.manual_seed(1)
    slow, slow_chain = ancestral_sample(diffusion, 32, x_T=x_T, return_chain=True, denoise_last=False)
    for step, (a, b) in enumerate(zip(fast_chain + [fast], slow_chain + [slow])):
        # float32 rounding (~6e-8 relative per operation), compounded over at most 20 steps
        torch.testing.assert_close(
            a, b, rtol=1e-4, atol=1e-4 * (1 + b.abs().max().item()), msg=f"x at {step}"
        )
    if decoder == "discretized":  # the last draw is rounded to a level; levels must agree
        assert torch.equal(fast, slow)


def test_tabulated_sampling_follows_the_schedule_when_it_moves():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(10), (2,))
    ancestral_sample(diffusion, 4)
    first = sampling._step_tables(diffusion, torch.float32, "cpu")
    diffusion.double()  # moves/recasts the buffers: a new table for float64 data
    second = sampling._step_tables(diffusion, torch.float64, "cpu")
    assert first is not second
    assert ancestral_sample(diffusion, 4, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("num_steps", [10, 1000])
def test_prior_term_is_accurate_in_float32(num_steps):
    schedule = NoiseSchedule.linear(num_steps)
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    alpha_bar = schedule.alphas_cumprod[-1]
    exact = 0.5 * (alpha_bar * x0**2 + (1 - alpha_bar) - torch.log1p(-alpha_bar) - 1).sum(1)
    assert torch.allclose(prior_term(schedule, x0), exact, rtol=1e-12)
    single = prior_term(schedule, x0.float()).double()
    # a few float32 roundings of values of the size of the result: 1e-6 relative
    assert ((single - exact).abs() / exact).max() < 1e-6


def test_default_chunk_respects_rows_and_elements():
    assert _default_chunk(16, 1000, 8192, 2, "cpu") == min(1000, min(8192, CHUNK_ELEMENTS["cpu"] // 2) // 16)
    assert _default_chunk(4, 1000, 8192, 64, "cpu") == CHUNK_ELEMENTS["cpu"] // 64 // 4
    assert _default_chunk(4096, 1000, 8192, 3072, "cpu") == 1  # never less than one step
    assert _default_chunk(16, 1000, 8192, 3072, "cuda") == math.floor(CHUNK_ELEMENTS["cuda"] / 3072 / 16)
    assert _default_chunk(16, 10, 8192, 2, "cpu") == 10  # never more than T
