"""8-bit digits, the level-weighted decoder, the network options measured for likelihood
(dropout, Fourier features) and the validation-tuned baselines."""

from __future__ import annotations

import math
import warnings

import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyro_diffusion import Diffusion, DiffusionELBO, LinearGamma, MLPDenoiser, StepDraw
from pyro_diffusion.baselines import PixelCategorical, tune_baselines
from pyro_diffusion.bound import bound
from pyro_diffusion.data import load_dataset
from pyro_diffusion.decoders import DiscretizedGaussian, LevelWeightedGaussian
from pyro_diffusion.nets.mlp import fourier_features
from pyro_diffusion.training import TrainConfig, build_diffusion


def levels(K):
    return torch.linspace(-1.0, 1.0, K, dtype=torch.float64)


def test_digits8_is_the_digits_on_256_levels_with_the_same_split():
    a, b = load_dataset("digits"), load_dataset("digits8")
    assert b.num_levels == 256 and b.event_shape == a.event_shape == (1, 8, 8)
    codes = (b.train.double() + 1) * 127.5
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().unique().numel() == 17
    v = (a.train.double() + 1) * 8  # 0..16
    assert torch.equal(codes.round(), torch.round(v * 255 / 16))
    assert torch.equal(a.labels_test, b.labels_test)


@pytest.mark.parametrize("K", [2, 17, 256])
def test_level_weighted_decoder_is_a_distribution_on_the_levels(K):
    torch.manual_seed(0)
    loc = torch.randn(5, 3, dtype=torch.float64)
    scale = torch.rand(5, 3, dtype=torch.float64) + 0.05
    logits = torch.randn(3, K, dtype=torch.float64)
    d = LevelWeightedGaussian(loc, scale, K, logits)
    total = torch.stack([d.log_prob(torch.full((5, 3), v.item(), dtype=torch.float64)) for v in levels(K)])
    assert torch.allclose(total.exp().sum(0), torch.ones(5, 3, dtype=torch.float64), atol=1e-10)
    x = d.sample((4,))
    assert x.shape == (4, 5, 3)
    assert torch.allclose(((x + 1) / 2 * (K - 1)), ((x + 1) / 2 * (K - 1)).round(), atol=1e-9)


def test_level_weighted_decoder_with_zero_logits_is_the_discretized_gaussian_for_wide_scales():
    loc = torch.linspace(-0.5, 0.5, 7, dtype=torch.float64)
    scale = torch.full_like(loc, 0.1)  # the tails beyond ±1, which the edge bins take, are < 1e-6
    K = 256
    x = torch.round((loc + 0.1 + 1) / 2 * (K - 1)) / (K - 1) * 2 - 1
    ours = LevelWeightedGaussian(loc, scale, K, torch.zeros(K, dtype=torch.float64)).log_prob(x)
    reference = DiscretizedGaussian(loc, scale, K).log_prob(x)
    assert torch.allclose(ours, reference, atol=2e-3)  # O((h/σ)²), h = 1/255


def test_the_logits_learn_the_levels_the_data_take():
    """Data on 17 of 256 levels: the plain discretized decoder cannot beat log2(255/16) bits
    of spread; with learned logits the cost falls to the 17-level one."""
    torch.manual_seed(0)
    K = 256
    x = torch.round(torch.randint(0, 17, (512, 4)).double() * 255 / 16) / 127.5 - 1
    loc = x + 0.08 * torch.randn_like(x)
    scale = torch.full_like(x, 0.08)
    logits = torch.zeros(4, K, dtype=torch.float64, requires_grad=True)
    before = -LevelWeightedGaussian(loc, scale, K, logits).log_prob(x).mean().item()
    optimizer = torch.optim.Adam([logits], lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        loss = -LevelWeightedGaussian(loc, scale, K, logits).log_prob(x).mean()
        loss.backward()
        optimizer.step()
    after = loss.item()
    assert before - after > 0.8 * math.log(255 / 16)


def test_a_diffusion_with_a_level_prior_trains_its_logits_and_pyro_agrees_on_the_bound():
    torch.manual_seed(0)
    d = Diffusion(
        MLPDenoiser(3, hidden=16, depth=1),
        LinearGamma(-5.0, 5.0),
        (3,),
        decoder="network",
        num_levels=17,
        level_prior=True,
    ).double()
    assert d.decoder_level_logits.shape == (3, 17)
    x0 = torch.round(torch.rand(6, 3, dtype=torch.float64) * 16) / 8 - 1
    u = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    pyro.set_rng_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = TraceMeanField_ELBO().loss(d.model, d.guide, x0, steps=StepDraw(times_values=u), num_steps=0)
    loss = DiffusionELBO(num_steps=0)
    loss.make_draw = lambda: StepDraw(times_values=u)
    pyro.set_rng_seed(1)
    assert ours == pytest.approx(loss.loss(d.model, d.guide, x0), rel=1e-10)
    value = DiffusionELBO(num_steps=0).differentiable_loss(d.model, d.guide, x0)
    value.backward()
    assert d.decoder_level_logits.grad.abs().sum() > 0
    assert torch.isfinite(bound(d, x0, num_steps=0, num_times=4).mean).all()


def test_level_prior_needs_k_level_data_and_is_a_train_flag():
    with pytest.raises(ValueError, match="level_prior"):
        Diffusion(MLPDenoiser(2), LinearGamma(-5.0, 5.0), (2,), level_prior=True)
    d = build_diffusion(TrainConfig(data="digits8", level_prior=True, steps=1), load_dataset("digits8"))
    assert d.level_prior and d.num_levels == 256
    assert "--level-prior" in TrainConfig(level_prior=True).flags()


def test_fourier_features_and_dropout_options():
    x = torch.tensor([[0.25, -0.5]])
    f = fourier_features(x, (0, 1))
    assert f.shape == (1, 4, 2)
    assert torch.allclose(f[0, 0], torch.sin(math.pi * x[0]))
    assert torch.allclose(f[0, 3], torch.cos(2 * math.pi * x[0]))
    net = MLPDenoiser((1, 8, 8), 32, 1, dropout=0.5, fourier=(2, 4))
    assert net.input.in_features == 64 * 7
    net.train()
    z, g = torch.randn(4, 1, 8, 8), torch.zeros(4)
    assert not torch.equal(net(z, g), net(z, g))  # dropout is on in training
    net.eval()
    assert torch.equal(net(z, g), net(z, g))
    for bad in ({"dropout": 1.0}, {"fourier": (3, 2)}, {"fourier": 2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MLPDenoiser(4, **bad)
    with pytest.raises(ValueError, match="fourier_min"):
        TrainConfig(fourier_min=2)
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(dropout=-0.1)


def test_default_mlp_is_unchanged_by_the_new_options():
    torch.manual_seed(0)
    a = MLPDenoiser((1, 8, 8), 32, 2)
    torch.manual_seed(0)
    b = MLPDenoiser((1, 8, 8), 32, 2, dropout=0.0, fourier=None)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_baselines_choose_their_pseudo_counts_on_validation_and_the_pooled_prior_suits_8_bit_data():
    data = load_dataset("digits8")
    chosen = tune_baselines(data, val_size=200, iterations=5, num_components=5)
    assert chosen["pixel_categorical"]["prior"] == "pooled"
    uniform = PixelCategorical(256, 1.0).fit(data.train[:-200])
    pooled = PixelCategorical(256, **{k: chosen["pixel_categorical"][k] for k in ("alpha", "prior")})
    pooled.fit(data.train[:-200])
    held = data.train[-200:]
    assert pooled.log_prob(held).mean() > uniform.log_prob(held).mean() + 64 * 0.1
    with pytest.raises(ValueError, match="val_size"):
        tune_baselines(data, val_size=0)
    with pytest.raises(ValueError, match="prior"):
        PixelCategorical(17, prior="flat")


def test_a_run_written_before_the_embedding_range_was_a_field_reloads_with_its_range(tmp_path):
    from pyro_diffusion.runs import read_json, write_json
    from pyro_diffusion.training import load_model, train

    out = tmp_path / "run"
    train(
        TrainConfig(data="digits", steps=2, batch_size=8, hidden=16, depth=1, progress=False),
        out,
        figures=False,
    )
    values = read_json(out / "config.json")
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    for name in ("embed_gamma_min", "embed_gamma_max"):  # as an earlier version wrote them
        values.pop(name)
        checkpoint["config"].pop(name)
    write_json(values, out / "config.json")
    torch.save(checkpoint, out / "checkpoint.pt")
    assert load_model(out).denoiser.embedding.gamma_range == (-15.0, 15.0)


def test_level_prior_starts_at_the_training_data_level_frequencies():
    data = load_dataset("digits8")
    d = build_diffusion(TrainConfig(data="digits8", level_prior=True, hidden=16, depth=1), data)
    d.init_level_prior(data.train)
    probs = d.decoder_level_logits.detach().exp()
    assert torch.allclose(probs.sum(-1), torch.ones(1, 8, 8), atol=1e-5)
    used = torch.round((data.train + 1) * 127.5).long().unique()
    unused = torch.ones(256, dtype=torch.bool)
    unused[used] = False
    assert used.numel() == 17 and probs[..., unused].sum(-1).max() < 0.01  # the 239 unused levels
    corner = (torch.round((data.train[:, 0, 0, 0] + 1) * 127.5) == 0).double().mean()
    assert probs[0, 0, 0, 0].item() == pytest.approx(
        corner.item(), abs=0.01
    )  # a corner pixel is nearly always 0
    with pytest.raises(ValueError, match="level_prior"):
        build_diffusion(
            TrainConfig(data="digits8", level_prior=False, hidden=16, depth=1), data
        ).init_level_prior(data.train)


def test_the_likelihood_study_trains_evaluates_pairs_and_tabulates(tmp_path):
    from pyro_diffusion.experiments import likelihood

    results = likelihood.run(
        "digits",
        ["recipe", "level-prior"],
        [0, 1],
        tmp_path,
        eval_times=2,
        overrides={"steps": 3, "hidden": 8},
    )
    assert len(results) == 4 and all(len(r["test_per_image_bpd"]) == 297 for r in results)
    first = results[0]
    parts = first["decoder_bpd"] + first["prior_bpd"] + first["first_bpd"] + first["rest_bpd"]
    assert parts == pytest.approx(first["test_bpd_continuous"], rel=0.2)  # the same bound, other draws
    again = likelihood.run("digits", ["recipe"], [0], tmp_path, eval_times=2)  # read back, not retrained
    assert again[0] == first
    iw = likelihood.importance_weighted(
        tmp_path / "digits" / "recipe" / "seed0", num_steps=5, num_particles=2
    )
    assert len(iw["per_image_iw_bpd"]) == 297 and iw["iw_bpd"] <= iw["elbo_bpd"]
    assert (
        likelihood.importance_weighted(tmp_path / "digits" / "recipe" / "seed0", num_steps=5, num_particles=2)
        == iw
    )
    curve = likelihood.importance_weighted_curve(
        tmp_path / "digits" / "recipe" / "seed0",
        tmp_path / "curve",
        particles=(1, 2, 4),
        num_steps=5,
        num_images=8,
    )
    assert [r["particles"] for r in curve["rows"]] == [1, 2, 4]
    assert (tmp_path / "curve" / "importance_weighted_curve.png").exists()
    iw_table = likelihood.importance_weighted_table("digits", tmp_path)
    assert "| recipe | 1 | 5 × 2 × 2 |" in iw_table
    v = likelihood.versus("digits", tmp_path, "level-prior", "recipe")
    assert v["seeds"] == [0, 1] and v["num_images"] == 297
    table = likelihood.summarize("digits", tmp_path, iterations=2)
    assert "| recipe | 3 | 2 |" in table and "mixture of 50 categoricals" in table
    with pytest.raises(ValueError, match="name"):
        likelihood.config_for("nonsense")
    with pytest.raises(SystemExit) as exit_info:
        likelihood.main(["--data", "digits", "--configs", "nonsense", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_the_level_prior_is_chosen_from_the_data_and_written_into_the_run(tmp_path):
    from pyro_diffusion.runs import read_json
    from pyro_diffusion.training import load_model, train

    assert TrainConfig(data="digits8").resolved(load_dataset("digits8")).level_prior is True  # 17 of 256
    assert TrainConfig(data="digits").resolved(load_dataset("digits")).level_prior is False  # all 17
    assert (
        TrainConfig(data="moons").resolved(load_dataset("moons", num_train=10, num_test=10)).level_prior
        is False
    )
    assert (
        TrainConfig(data="digits8", level_prior=False).resolved(load_dataset("digits8")).level_prior is False
    )
    with pytest.raises(ValueError, match="level_prior"):
        TrainConfig(level_prior="yes")
    out = tmp_path / "run"
    train(
        TrainConfig(data="digits8", steps=2, batch_size=8, hidden=16, depth=1, progress=False),
        out,
        figures=False,
    )
    assert read_json(out / "config.json")["level_prior"] is True
    assert load_model(out).level_prior


def test_the_log_snr_schedule_starts_at_a_fixed_fraction_of_the_level_spacing(tmp_path):
    from pyro_diffusion.training import build_diffusion, default_log_snr_max

    assert default_log_snr_max(None) == 7.0 and default_log_snr_max(17) == 7.0
    for K in (17, 256):
        sigma_1 = (1 / (1 + math.exp(default_log_snr_max(K)))) ** 0.5
        assert sigma_1 / (2 / (K - 1)) == pytest.approx(0.2409, abs=1e-3)  # the same fraction of a level
    config = TrainConfig(data="digits8", hidden=8, depth=1)
    resolved = config.resolved(load_dataset("digits8"))
    assert resolved.schedule == "log-snr" and resolved.log_snr_max == pytest.approx(
        7 + 2 * math.log(255 / 16)
    )
    diffusion = build_diffusion(resolved, load_dataset("digits8"))
    assert -diffusion.grid()[0].item() == pytest.approx(resolved.log_snr_max, abs=1e-6)
    assert TrainConfig(data="digits").resolved(load_dataset("digits")).log_snr_max == 7.0
    assert TrainConfig(data="digits8", log_snr_max=9.0).resolved(load_dataset("digits8")).log_snr_max == 9.0
