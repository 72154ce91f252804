"""The diffusion as a prior inside a user's Pyro model: scoped sites, frozen parameters,
opt-in fine-tuning, plates, and the chain's identities."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from inference_helpers import linear_chain_marginal, linear_diffusion
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.reparam import LocScaleReparam

from pyro_diffusion.inference.prior import DiffusionPrior


def _sample_sites(trace):
    return [name for name, site in trace.nodes.items() if site["type"] == "sample"]


def test_two_uses_have_scoped_sites_that_do_not_collide():
    prior = DiffusionPrior(linear_diffusion())

    def model():
        prior("a")
        prior("b")

    sites = _sample_sites(poutine.trace(model).get_trace())
    T = prior.num_steps
    assert sites == prior.site_names("a") + prior.site_names("b")
    assert sites[0] == f"a/x_{T}" and sites[T] == "a/x_0" and len(sites) == 2 * (T + 1)


def test_bad_name_and_obs_shape_are_refused():
    prior = DiffusionPrior(linear_diffusion())
    with pytest.raises(ValueError, match="name"):
        prior("")
    with pytest.raises(ValueError, match="obs"):
        prior("a", obs=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="decoder"):
        DiffusionPrior(linear_diffusion(), decoder="exact")
    with pytest.raises(ValueError, match="num_steps"):
        DiffusionPrior(linear_diffusion(), num_steps=0)
    with pytest.raises(TypeError, match="diffusion"):
        DiffusionPrior(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="k"):
        prior.step_distribution(torch.zeros(2), 7)


def _user_model(prior, y):
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("items", y.shape[0]):
        x = prior("x")
        pyro.sample("y", dist.Normal(x, sigma.unsqueeze(-1)).to_event(1), obs=y)


def test_user_svi_leaves_frozen_weights_unchanged_and_out_of_the_param_store():
    diffusion = linear_diffusion()
    before = {k: v.clone() for k, v in diffusion.state_dict().items()}
    prior = DiffusionPrior(diffusion)
    y = torch.randn(3, 2)
    guide = AutoNormal(lambda y: _user_model(prior, y))
    svi = SVI(lambda y: _user_model(prior, y), guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    losses = [svi.step(y) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(before[k], v) for k, v in diffusion.state_dict().items())
    assert all(p.grad is None for p in diffusion.parameters())
    assert all(p.requires_grad for p in diffusion.parameters())  # restored after each call
    names = list(pyro.get_param_store().keys())
    assert names and not any(n.startswith(diffusion.name) for n in names)
    # the guide did learn something: its parameters moved away from their initial values
    assert any("x/x_0" in n for n in names)


def test_fine_tune_trains_the_weights_through_the_users_svi():
    diffusion = linear_diffusion()
    before = {k: v.clone() for k, v in diffusion.state_dict().items()}
    prior = DiffusionPrior(diffusion, fine_tune=True, module_name="tuned")
    y = torch.randn(3, 2)
    guide = AutoNormal(lambda y: _user_model(prior, y))
    svi = SVI(lambda y: _user_model(prior, y), guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(3):
        svi.step(y)
    assert any(n.startswith("tuned$$$") for n in pyro.get_param_store().keys())
    assert not all(torch.equal(before[k], v) for k, v in diffusion.state_dict().items())


def test_gradients_reach_the_chain_but_not_the_weights():
    diffusion = linear_diffusion()
    prior = DiffusionPrior(diffusion)
    x_T = torch.randn(2, requires_grad=True)
    conditioned = poutine.condition(lambda: prior("x"), data={"x/x_5": x_T})
    x0 = conditioned()
    x0.sum().backward()
    assert x_T.grad is not None and x_T.grad.abs().sum() > 0
    assert all(p.grad is None for p in diffusion.parameters())


@pytest.mark.parametrize("outer", [None, 4])
def test_batch_shapes_follow_the_users_plates(outer):
    prior = DiffusionPrior(linear_diffusion(event_shape=(1, 2, 2)))

    def model():
        with pyro.plate("inner", 3, dim=-1):
            if outer is None:
                return prior("x")
            with pyro.plate("outer", outer, dim=-2):
                return prior("x")

    trace = poutine.trace(model).get_trace()
    expected = (3,) if outer is None else (outer, 3)
    for name in prior.site_names("x"):
        site = trace.nodes[name]
        assert site["value"].shape == expected + (1, 2, 2)
        assert site["fn"].batch_shape == expected and site["fn"].event_shape == (1, 2, 2)


def test_vectorized_particles_compose_with_the_prior():
    prior = DiffusionPrior(linear_diffusion())
    y = torch.randn(3, 2)
    model = lambda y: _user_model(prior, y)  # noqa: E731
    guide = AutoNormal(model)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.loss(model, guide, y)
    assert torch.isfinite(torch.tensor(loss))


def test_observed_x0_scores_the_decoder_of_the_sampled_x1():
    diffusion = linear_diffusion()
    prior = DiffusionPrior(diffusion)
    x = torch.randn(5, 2)
    with pyro.plate("data", 5):
        trace = poutine.trace(lambda: prior("x", obs=x)).get_trace()
    site = trace.nodes["x/x_0"]
    assert site["is_observed"] and torch.equal(site["value"], x)
    x1 = trace.nodes["x/x_1"]["value"]
    decoder = diffusion.decoder_distribution(x1, diffusion.grid()[0])
    torch.testing.assert_close(site["fn"].log_prob(x), decoder.log_prob(x).sum(-1))


def test_non_centred_chain_reproduces_the_sampled_chain():
    prior = DiffusionPrior(linear_diffusion())
    names = prior.site_names("x")
    reparam = poutine.reparam(lambda: prior("x"), config={n: LocScaleReparam(centered=0.0) for n in names})
    with pyro.plate("draws", 7):
        trace = poutine.trace(reparam).get_trace()
    T = prior.num_steps
    noise = {T - i: trace.nodes[f"{n}_decentered"]["value"] for i, n in enumerate(names)}
    torch.testing.assert_close(prior.chain_from_noise(noise), trace.nodes["x/x_0"]["value"])


def test_prior_draws_match_the_exact_marginal_of_a_linear_chain():
    """Mean of 4000 draws within 4 standard errors of the exact Gaussian p_θ(x_0)."""
    diffusion = linear_diffusion()
    prior = DiffusionPrior(diffusion)
    n = 4000
    with torch.no_grad(), pyro.plate("draws", n):
        draws = prior("x").to(torch.float64)
    mean, cov = linear_chain_marginal(diffusion)
    se = (cov.diagonal() / n).sqrt()
    assert ((draws.mean(0) - mean).abs() < 4 * se).all()
    # variances: the standard error of a sample variance of a Gaussian is var·√(2/(n−1))
    var_se = cov.diagonal() * (2 / (n - 1)) ** 0.5
    assert ((draws.var(0) - cov.diagonal()).abs() < 4 * var_se).all()


def test_chain_guide_draws_the_core_forward_chain():
    """chain_guide (no plate, scoped names) samples the same posterior-order chain as the
    core guide: with the same seed, every site has the same value."""
    from pyro_diffusion.chains import site_name
    from pyro_diffusion.inference import chain_guide

    diffusion = linear_diffusion()
    x0 = torch.randn(3, *diffusion.event_shape)
    pyro.set_rng_seed(7)
    core = poutine.trace(diffusion.guide).get_trace(x0)
    pyro.set_rng_seed(7)
    scoped = poutine.trace(chain_guide).get_trace(diffusion, x0, "a")
    for t in range(1, diffusion.num_steps + 1):
        torch.testing.assert_close(
            scoped.nodes[site_name(t, "a/")]["value"], core.nodes[site_name(t)]["value"]
        )


def test_reparam_config_non_centres_only_the_chain_sites():
    prior = DiffusionPrior(linear_diffusion())
    config = prior.reparam_config("x")
    assert sorted(config) == sorted(prior.site_names("x"))
    assert all(isinstance(r, LocScaleReparam) for r in config.values())
    with pyro.plate("draws", 5):
        trace = poutine.trace(poutine.reparam(lambda: prior("x"), config=config)).get_trace()
    latent = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    assert latent == prior.decentered_site_names("x")
    T = prior.num_steps
    noise = {T - i: trace.nodes[n]["value"] for i, n in enumerate(latent)}
    torch.testing.assert_close(prior.chain_from_noise(noise), trace.nodes["x/x_0"]["value"])
    with pytest.raises(ValueError, match="name"):
        prior.reparam_config("")
    with pytest.raises(ValueError, match="centered"):
        prior.reparam_config("x", centered=2.0)


def test_a_config_callable_that_reparameterizes_the_noise_again_is_refused():
    """Pyro would recurse forever (x_k_decentered_decentered_…); the prior raises at once."""
    prior = DiffusionPrior(linear_diffusion())
    everything = poutine.reparam(lambda: prior("x"), config=lambda site: LocScaleReparam(centered=0.0))
    with pytest.raises(ValueError, match=r"config: .*'x/x_5_decentered' again.*_decentered"):
        poutine.trace(everything).get_trace()
    # a callable that skips the new sites is fine, and equals the dict config
    skipping = poutine.reparam(
        lambda: prior("x"),
        config=lambda site: None if site["name"].endswith("_decentered") else LocScaleReparam(centered=0.0),
    )
    trace = poutine.trace(skipping).get_trace()
    assert prior.decentered_site_names("x")[-1] in trace.nodes
