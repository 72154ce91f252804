"""The importance-weighted bound over whole trajectories of the forward chain: its log weights
average to the ELBO, it equals Pyro's own importance-weighted objective (``RenyiELBO`` with
α = 0) run on the model and guide programs, and it tightens as particles are added."""

import math

import pytest
import torch
from pyro.infer import RenyiELBO
from test_chains import data, make

from _helpers import mean_and_se
from pyro_diffusion import Diffusion, MLPDenoiser
from pyro_diffusion.bound import importance_weighted_bound, log_importance_weights, vlb_terms
from pyro_diffusion.schedules import LinearGamma, MultivariateLearnedGamma

BETAS = torch.linspace(0.02, 0.3, 5, dtype=torch.float64)


def test_mean_log_weight_is_the_elbo():
    d = make((2,), betas=BETAS)
    x0 = data((2,), n=3)
    torch.manual_seed(0)
    log_w = log_importance_weights(d, x0.repeat(20, 1), num_particles=200)  # 4,000 per datum
    per_datum = -log_w.reshape(200 * 20, 3)
    elbo = vlb_terms(d, x0.repeat(4000, 1)).sum(1).reshape(4000, 3)
    for j in range(3):
        a, a_se = per_datum[:, j].mean().item(), per_datum[:, j].std().item() / math.sqrt(4000)
        b, b_se = elbo[:, j].mean().item(), elbo[:, j].std().item() / math.sqrt(4000)
        assert abs(a - b) < 4 * math.hypot(a_se, b_se), (j, a, a_se, b, b_se)


def test_equals_pyro_renyi_elbo_at_alpha_zero():
    """Pyro's RenyiELBO(alpha=0) is the importance-weighted bound of its programs: on one datum
    its loss and ours (nats) agree in mean over independent repeats."""
    d = make((2,), betas=BETAS[:4])
    x0 = data((2,), n=1)
    torch.manual_seed(1)
    with torch.no_grad():
        pyro_loss, pyro_se = mean_and_se(
            [RenyiELBO(alpha=0, num_particles=8).loss(d.model, d.guide, x0) for _ in range(80)]
        )
    log_w = log_importance_weights(d, x0.repeat(2000, 1), num_particles=8)
    ours = -(torch.logsumexp(log_w, 0) - math.log(8))
    ours_mean, ours_se = ours.mean().item(), ours.std().item() / math.sqrt(ours.numel())
    assert abs(pyro_loss - ours_mean) < 4 * math.hypot(pyro_se, ours_se), (
        pyro_loss,
        pyro_se,
        ours_mean,
        ours_se,
    )
    # and it is a different number from the ELBO here (the test can tell them apart)
    elbo = -log_w.mean().item()
    assert elbo - ours_mean > 8 * math.hypot(pyro_se, ours_se)


def test_tighter_with_more_particles():
    d = make((2,), betas=BETAS)
    x0 = data((2,), n=1).repeat(400, 1)  # 400 independent estimates of one datum's bound
    torch.manual_seed(2)
    values = {}
    for m in (1, 4, 32):
        log_w = log_importance_weights(d, x0, num_particles=m)
        est = -(torch.logsumexp(log_w, 0) - math.log(m))
        values[m] = (est.mean().item(), est.std().item() / math.sqrt(est.numel()))
    for low, high in ((1, 4), (4, 32)):
        (a, a_se), (b, b_se) = values[low], values[high]
        assert a - b > 4 * math.hypot(a_se, b_se), values


def _k_level_diffusion(schedule, event_shape=(4,), level_prior=False):
    torch.manual_seed(0)
    net = MLPDenoiser(event_shape, hidden=16, depth=1)
    return Diffusion(
        net, schedule, event_shape, decoder="network", num_levels=17, num_steps=None, level_prior=level_prior
    )


@pytest.mark.parametrize("kind", ["scalar", "multivariate", "level-prior"])
def test_k_level_and_per_dimension_models(kind):
    schedule = MultivariateLearnedGamma((4,), -2.0, 4.0) if kind == "multivariate" else LinearGamma(-2.0, 4.0)
    d = _k_level_diffusion(schedule, level_prior=kind == "level-prior")
    levels = torch.randint(0, 17, (6, 4))
    x0 = -1 + 2 * levels.to(torch.float32) / 16
    est = importance_weighted_bound(d, x0, num_steps=20, num_particles=4, num_repeats=3)
    assert est.mean.shape == (6,) and torch.isfinite(est.mean).all()
    assert (est.standard_error > 0).all()
    # never looser than the single-trajectory ELBO of the same chain, in expectation
    log_w = log_importance_weights(d, x0, num_steps=20, num_particles=64)
    assert (torch.logsumexp(log_w, 0) - math.log(64) >= log_w.mean(0) - 1e-9).all()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_particles": 0}, "num_particles"),
        ({"num_particles": 2.5}, "num_particles"),
        ({"num_repeats": 1}, "num_repeats"),
        ({"max_items": 0}, "max_items"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, argument):
    d = make((2,), betas=BETAS)
    with pytest.raises(ValueError, match=argument):
        importance_weighted_bound(d, data((2,), n=2), **kwargs)


def test_cli_evaluate_importance_weighted(tmp_path, capsys):
    import json

    from pyro_diffusion.cli import main

    tiny = ["--num-steps", "20", "--hidden", "16", "--depth", "1", "--batch-size", "32", "--no-progress"]
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--steps", "5", "--out", str(run)] + tiny) == 0
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    elbo = json.loads((run / "metrics.json").read_text())["test_bits_per_dim"]
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--importance-particles", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['test_iw_bits_per_dim']:.4f}" in printed
    assert metrics["test_iw_num_steps"] == 20 and metrics["test_iw_particles"] == 4
    assert metrics["test_bits_per_dim"] == elbo  # the ELBO is kept beside it
    assert metrics["test_iw_bits_per_dim"] < elbo  # an untrained chain: far from its posterior
    for bad in (
        ["--num-steps", "0"],
        ["--num-steps", "1"],
        ["--num-times", "5"],
        ["--importance-particles", "0"],
    ):
        args = ["evaluate", "--run", str(run), "--no-progress"]
        if bad[0] != "--importance-particles":
            args += ["--importance-particles", "4"]
        try:
            status = main(args + bad)
        except SystemExit as exit:  # argparse's own check of the value
            status = exit.code
        assert status == 2
        assert bad[0] in capsys.readouterr().err
