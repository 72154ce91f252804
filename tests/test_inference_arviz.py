"""ArviZ conversion round-trips the numbers; the paired comparison of bounds."""

import math

import arviz as az
import numpy as np
import pytest
import torch
from inference_helpers import linear_diffusion

from pyro_diffusion.inference import arviz as pd_arviz
from pyro_diffusion.inference.result import PosteriorResult


def _nuts_result():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 40, 2, generator=g)
    return PosteriorResult(
        draws=x0.reshape(120, 2),
        diagnostics={
            "noise": {"x/x_0_decentered": torch.randn(3, 40, 2, generator=g)},
            "sample_stats": {
                "diverging": torch.rand(3, 40, generator=g) < 0.1,
                "lp": torch.randn(3, 40, generator=g),
                "step_size": torch.full((3, 40), 0.3),
                "tree_size": torch.randint(1, 8, (3, 40), generator=g),
            },
        },
        seconds=1.0,
        network_calls=10,
        method="nuts",
        num_steps=5,
        num_chains=3,
    )


def test_from_nuts_round_trips_draws_and_sample_stats():
    result = _nuts_result()
    x0 = result.chains()
    idata = pd_arviz.from_nuts(result, include_noise=True)
    np.testing.assert_array_equal(idata.posterior["x0"].values, x0.numpy())
    noise = result.diagnostics["noise"]["x/x_0_decentered"]
    np.testing.assert_array_equal(idata.posterior["x/x_0_decentered"].values, noise.numpy())
    assert idata.posterior["x0"].dims == ("chain", "draw", "coordinate")
    for key, value in result.diagnostics["sample_stats"].items():
        np.testing.assert_array_equal(idata.sample_stats[key].values, value.numpy())
    assert idata.posterior.attrs["network_calls"] == 10 and idata.posterior.attrs["num_steps"] == 5
    summary = az.summary(idata, var_names=["x0"])
    np.testing.assert_allclose(summary["mean"].values, x0.reshape(-1, 2).mean(0).numpy(), atol=1e-3)
    # R-hat through ArviZ equals R-hat of the same numbers computed directly
    direct = [az.rhat(x0.numpy()[..., i]) for i in range(2)]
    np.testing.assert_allclose(summary["r_hat"].values, direct, atol=0.01)
    # from_result picks the same converter
    np.testing.assert_array_equal(pd_arviz.from_result(result).posterior["x0"].values, x0.numpy())


def test_from_smc_draws_from_the_weighted_particles_and_keeps_diagnostics():
    K = 500
    particles = torch.stack([torch.zeros(K), torch.arange(K, dtype=torch.float32)], 1)
    log_weights = torch.full((K,), -math.inf)
    log_weights[:2] = math.log(0.5)  # all mass on particles 0 and 1
    result = PosteriorResult(
        draws=particles,
        log_weights=log_weights,
        diagnostics={
            "ess": torch.linspace(1, K, 6),
            "resampled": torch.tensor([False, True, False, False, True, False]),
            "log_evidence": -1.25,
        },
        seconds=0.5,
        network_calls=5,
        method="twisted_smc",
    )
    idata = pd_arviz.from_smc(result, num_draws=1000)
    draws = idata.posterior["x0"].values
    assert draws.shape == (1, 1000, 2)
    assert set(np.unique(draws[0, :, 1])) <= {0.0, 1.0}
    # half the draws on each: binomial standard error √(1000·¼)
    assert abs((draws[0, :, 1] == 1.0).sum() - 500) < 4 * math.sqrt(250)
    diag = idata.smc_diagnostics
    np.testing.assert_array_equal(diag["particles"].values, particles.numpy())
    np.testing.assert_array_equal(diag["ess"].values, result.diagnostics["ess"].numpy())
    np.testing.assert_array_equal(diag["resampled"].values, result.diagnostics["resampled"].numpy())
    assert float(diag["log_evidence"]) == -1.25 and diag.attrs["network_calls"] == 5


def test_from_svi_keeps_the_loss_trace_and_draws_the_guide():
    loc, scale = torch.tensor([1.0, -2.0]), torch.tensor([0.1, 0.5])

    def sampler(n, generator=None):
        return loc + scale * torch.randn(n, 2, generator=generator)

    result = PosteriorResult(
        draws=sampler(10),
        diagnostics={"loc": loc, "scale": scale, "losses": [3.0, 2.0, 1.5]},
        seconds=1.0,
        network_calls=9,
        method="svi",
        sampler=sampler,
    )
    idata = pd_arviz.from_svi(result, num_draws=4000)
    np.testing.assert_array_equal(idata.loss["loss"].values, [3.0, 2.0, 1.5])
    draws = idata.posterior["x0"].values.reshape(-1, 2)
    assert draws.shape == (4000, 2)  # fresh draws of q, not resampled from the 10 kept
    se = scale.numpy() / math.sqrt(4000)
    assert (np.abs(draws.mean(0) - loc.numpy()) < 4 * se).all()


def test_from_result_takes_plain_draws_and_refuses_other_types():
    draws = torch.randn(50, 2)
    result = PosteriorResult(draws=draws, method="dps", num_steps=5)
    idata = pd_arviz.from_result(result)
    np.testing.assert_array_equal(idata.posterior["x0"].values[0], draws.numpy())
    assert idata.posterior.attrs["method"] == "dps"
    with pytest.raises(TypeError, match="result"):
        pd_arviz.from_nuts(object())
    with pytest.raises(ValueError, match="result"):
        pd_arviz.from_smc(result)


def test_posterior_result_resamples_by_weight_and_checks_shapes():
    draws = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    log_weights = torch.tensor([0.25, 0.75, 0.0]).log()
    result = PosteriorResult(draws=draws, log_weights=log_weights)
    n = 4000
    sample = result.sample(n, generator=torch.Generator().manual_seed(0))
    share = (sample[:, 0] == 1.0).double().mean().item()
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    assert not (sample[:, 0] == 2.0).any()
    torch.testing.assert_close(result.mean(), torch.tensor([0.75, 0.75], dtype=torch.float64))
    assert result.ess == pytest.approx(1 / (0.25**2 + 0.75**2))
    with pytest.raises(ValueError, match="log_weights"):
        PosteriorResult(draws=draws, log_weights=torch.zeros(2))
    with pytest.raises(ValueError, match="num_chains"):
        PosteriorResult(draws=draws, num_chains=2)
    with pytest.raises(ValueError, match="num_samples"):
        result.sample(0)


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
