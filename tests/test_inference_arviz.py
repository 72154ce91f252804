"""ArviZ conversion round-trips the numbers; the paired comparison of bounds."""

import math

import arviz as az
import numpy as np
import pytest
import torch
from inference_helpers import linear_diffusion

from pyro_diffusion.inference import arviz as pd_arviz
from pyro_diffusion.inference.nuts import NUTSResult
from pyro_diffusion.inference.smc import SMCResult
from pyro_diffusion.inference.svi import SVIResult


def _nuts_result():
    g = torch.Generator().manual_seed(0)
    return NUTSResult(
        x0=torch.randn(3, 40, 2, generator=g),
        noise={"x/x_0_decentered": torch.randn(3, 40, 2, generator=g)},
        sample_stats={
            "diverging": torch.rand(3, 40, generator=g) < 0.1,
            "lp": torch.randn(3, 40, generator=g),
            "step_size": torch.full((3, 40), 0.3),
            "tree_size": torch.randint(1, 8, (3, 40), generator=g),
        },
        seconds=1.0,
        network_calls=10,
    )


def test_from_nuts_round_trips_draws_and_sample_stats():
    result = _nuts_result()
    idata = pd_arviz.from_nuts(result, include_noise=True)
    np.testing.assert_array_equal(idata.posterior["x0"].values, result.x0.numpy())
    np.testing.assert_array_equal(
        idata.posterior["x/x_0_decentered"].values, result.noise["x/x_0_decentered"].numpy()
    )
    assert idata.posterior["x0"].dims == ("chain", "draw", "coordinate")
    for key, value in result.sample_stats.items():
        np.testing.assert_array_equal(idata.sample_stats[key].values, value.numpy())
    summary = az.summary(idata, var_names=["x0"])
    np.testing.assert_allclose(summary["mean"].values, result.x0.reshape(-1, 2).mean(0).numpy(), atol=1e-3)
    # R-hat through ArviZ equals R-hat of the same numbers computed directly
    direct = [az.rhat(result.x0.numpy()[..., i]) for i in range(2)]
    np.testing.assert_allclose(summary["r_hat"].values, direct, atol=0.01)


def test_from_smc_draws_from_the_weighted_particles_and_keeps_diagnostics():
    K = 500
    particles = torch.stack([torch.zeros(K), torch.arange(K, dtype=torch.float32)], 1)
    log_weights = torch.full((K,), -math.inf)
    log_weights[:2] = math.log(0.5)  # all mass on particles 0 and 1
    result = SMCResult(
        particles=particles,
        log_weights=log_weights,
        ess=torch.linspace(1, K, 6),
        resampled=torch.tensor([False, True, False, False, True, False]),
        log_evidence=-1.25,
        seconds=0.5,
        network_calls=5,
    )
    idata = pd_arviz.from_smc(result, num_draws=1000)
    draws = idata.posterior["x0"].values
    assert draws.shape == (1, 1000, 2)
    assert set(np.unique(draws[0, :, 1])) <= {0.0, 1.0}
    # half the draws on each: binomial standard error √(1000·¼)
    assert abs((draws[0, :, 1] == 1.0).sum() - 500) < 4 * math.sqrt(250)
    diag = idata.smc_diagnostics
    np.testing.assert_array_equal(diag["particles"].values, particles.numpy())
    np.testing.assert_array_equal(diag["ess"].values, result.ess.numpy())
    np.testing.assert_array_equal(diag["resampled"].values, result.resampled.numpy())
    assert float(diag["log_evidence"]) == -1.25 and diag.attrs["network_calls"] == 5


def test_from_svi_keeps_the_loss_trace_and_draws_the_guide():
    result = SVIResult(
        loc=torch.tensor([1.0, -2.0]),
        scale=torch.tensor([0.1, 0.5]),
        losses=[3.0, 2.0, 1.5],
        seconds=1.0,
        network_calls=9,
    )
    idata = pd_arviz.from_svi(result, num_draws=4000)
    np.testing.assert_array_equal(idata.loss["loss"].values, [3.0, 2.0, 1.5])
    draws = idata.posterior["x0"].values.reshape(-1, 2)
    se = result.scale.numpy() / math.sqrt(4000)
    assert (np.abs(draws.mean(0) - result.loc.numpy()) < 4 * se).all()


def test_from_bounds_holds_per_datum_elbo_terms_and_bits():
    diffusion = linear_diffusion()
    x = torch.randn(20, 2)
    torch.manual_seed(3)
    idata = pd_arviz.from_bounds(diffusion, x)
    torch.manual_seed(3)
    terms = diffusion.vlb_terms(x).double()
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0, 0], -terms.sum(-1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(idata.bound_terms["terms"].values, terms.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        idata.bound_terms["bits_per_dim"].values, (terms.sum(-1) / (2 * math.log(2))).numpy(), rtol=1e-6
    )
    np.testing.assert_array_equal(idata.observed_data["x"].values, x.numpy())
    with pytest.raises(ValueError, match="num_draws"):
        pd_arviz.from_bounds(diffusion, x, num_draws=0)


def test_paired_bound_difference_is_the_mean_and_standard_error_of_differences():
    a = np.array([-1.0, -2.0, -3.0, -4.0])
    b = np.array([-1.5, -2.0, -3.5, -4.25])
    out = pd_arviz.paired_bound_difference(a, b, event_size=2)
    diff = a - b
    assert out["mean"] == pytest.approx(diff.mean())
    assert out["se"] == pytest.approx(diff.std(ddof=1) / 2)
    assert out["mean_bpd"] == pytest.approx(diff.mean() / (2 * math.log(2)))
    with pytest.raises(ValueError, match="same"):
        pd_arviz.paired_bound_difference(a, b[:3])
