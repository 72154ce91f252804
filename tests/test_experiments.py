"""The experiments: the schedule study (configurations, training, validation and checkpoint
selection, the paired comparisons) and its driver."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyro_diffusion import (
    Diffusion,
    DiffusionELBO,
    LearnedGamma,
    LinearGamma,
    MLPDenoiser,
    NoiseSchedule,
    SimplifiedLoss,
    engine,
)
from pyro_diffusion.engine import Engine
from pyro_diffusion.experiments import schedule_study as ex
from pyro_diffusion.training import elbo_module


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small tensor operations: one thread is faster on a shared box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_core_modules_do_not_import_the_experiments():
    import subprocess
    import sys

    code = (
        "import sys, pyro_diffusion, pyro_diffusion.training, pyro_diffusion.cli, pyro_diffusion.distributed;"
        "print(any(m.startswith('pyro_diffusion.experiments') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_vdm_comparison_writes_results_and_reuses_runs(tmp_path):
    settings = dict(steps=3, hidden=16, depth=1, eval_times=2, eval_steps=(4,), baselines=False)
    table = ex.run_vdm_comparison(["learned", "tuned"], [0], tmp_path, **settings)
    assert "| learned | 1 |" in table and "| tuned | 1 |" in table
    assert (tmp_path / "results.md").exists() and (tmp_path / "learned_schedule_curves.png").exists()
    stamp = (tmp_path / "tuned_seed0.json").stat().st_mtime_ns
    ex.run_vdm_comparison(["tuned"], [0], tmp_path, **settings)
    assert (tmp_path / "tuned_seed0.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="configs"):
        ex.run_vdm_comparison(["fancy"], [0], tmp_path, **settings)


def test_experiment_builds_its_configurations_with_the_core_api():
    diffusion, loss, trainer = ex.build(
        "learned-anchored", (1, 8, 8), 17, hidden=8, depth=1, decoder="network"
    )
    assert isinstance(diffusion, Diffusion) and isinstance(diffusion.schedule, LearnedGamma)
    assert isinstance(diffusion.denoiser, MLPDenoiser)
    assert diffusion.decoder == "network" and diffusion.anchor == -4.0 and diffusion.num_levels == 17
    assert diffusion.variance == "small" and diffusion.mean == "eps"
    assert isinstance(loss, DiffusionELBO) and loss.num_steps == 0 and loss.times == "low-discrepancy"
    assert loss.minimize_variance
    simple = ex.make_loss("simple")
    assert isinstance(simple, SimplifiedLoss) and simple.num_steps == 0
    assert isinstance(ex.make_schedule("tuned"), LinearGamma)
    assert ex.make_schedule("ddpm-linear").num_steps == 1000
    assert ex.library_num_steps(None) == 0 and ex.library_num_steps(16) == 17
    with pytest.raises(ValueError, match="decoder"):
        ex.build("tuned", (1, 8, 8), 17, decoder="denoiser")
    assert isinstance(trainer, Engine) and trainer.clip_value == 10.0 and trainer.sampling == "replacement"
    before = diffusion.denoiser.input.weight.detach().clone()
    value = trainer.step(torch.zeros(4, 1, 8, 8))  # one optimizer step of the engine
    assert value.dim() == 0 and math.isfinite(value.item())  # the summed loss, detached
    assert not torch.equal(before, diffusion.denoiser.input.weight)


def test_experiment_passes_the_decoder_through():
    result = ex.train_and_evaluate(
        "tuned", steps=2, hidden=8, depth=1, eval_times=2, eval_steps=(), decoder="network", tuned=(-3.0, 4.0)
    )
    plain = ex.train_and_evaluate(
        "tuned", steps=2, hidden=8, depth=1, eval_times=2, eval_steps=(), tuned=(-3.0, 4.0)
    )
    assert result["decoder"] == "network" and result["decoder_bpd"] != plain["decoder_bpd"]
    assert len(result["profile_T20_bpd"]) == 20 and all(v >= 0 for v in result["profile_T20_bpd"])


def test_experiment_validation_ema_weight_decay_and_paired_comparison():
    from pyro_diffusion.baselines import CategoricalMixture
    from pyro_diffusion.data import load_dataset

    dataset = load_dataset("digits")
    kept, held = ex.split_validation(dataset.train, 50)
    assert kept.shape[0] + held.shape[0] == dataset.train.shape[0] and held.shape[0] == 50
    assert torch.equal(ex.split_validation(dataset.train, 50)[1], held)  # the same split every call
    with pytest.raises(ValueError, match="val_size"):
        ex.split_validation(dataset.train, dataset.train.shape[0])
    with pytest.raises(ValueError, match="eval_every"):
        ex.train_and_evaluate("tuned", steps=1, hidden=8, depth=1, eval_times=2, eval_steps=(), eval_every=1)
    settings = dict(steps=4, hidden=8, depth=1, eval_times=3, eval_steps=(), decoder="network")
    result = ex.train_and_evaluate(
        "learned", val_size=40, eval_every=2, val_times=2, ema=0.9, weight_decay=1e-3, **settings
    )
    assert [row[0] for row in result["val_history"]] == [2, 4]
    assert result["val_bpd"] == min(row[1] for row in result["val_history"])
    assert result["best_step"] in (2, 4) and result["ema"] == 0.9 and result["weight_decay"] == 1e-3
    per_image = torch.tensor(result["test_per_image_bpd"], dtype=torch.float64)
    assert per_image.shape == (dataset.test.shape[0],)
    assert math.isclose(per_image.mean().item(), result["test_bpd_continuous"], rel_tol=1e-9)
    plain = ex.train_and_evaluate("tuned", **settings)
    assert "val_bpd" not in plain and "ema" not in plain  # off by default
    paired = ex.paired_comparison([result, {**result, "seed": 1}], dataset, num_components=5)
    fitted = CategoricalMixture(dataset.num_levels, 5, seed=0).fit(dataset.train)  # fitted once, reused
    again = ex.paired_comparison([result, {**result, "seed": 1}], dataset, mixture=fitted)
    assert again["difference"] == pytest.approx(paired["difference"], abs=1e-12)
    assert paired["seeds"] == [0, 1] and paired["num_images"] == dataset.test.shape[0]
    assert math.isclose(paired["diffusion_bpd"], result["test_bpd_continuous"], rel_tol=1e-9)
    assert math.isclose(paired["difference"], paired["mixture_bpd"] - paired["diffusion_bpd"], abs_tol=1e-9)
    assert paired["difference_se"] > 0 and 0 < paired["mc_se"] < result["test_bpd_continuous_se"]
    difference, se = ex.paired_difference([1.0, 2.0, 4.0], [0.0, 1.0, 2.0])
    assert difference == pytest.approx(4 / 3) and se == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))


def test_experiment_optimizer_settings_reach_the_right_parameters():
    settings = ex.optim_args(2e-3, 1e-2, 1e-4)
    assert settings("schedule.gamma_min") == {"lr": 1e-2, "weight_decay": 0.0}
    assert settings("denoiser.input.weight")["weight_decay"] == 1e-4
    assert settings("decoder_log_scale") == {"lr": 2e-3, "weight_decay": 0.0}
    assert ex.optim_args(2e-3)("schedule.gamma_min")["lr"] == 2e-3  # default: one learning rate
    diffusion = ex.make_diffusion("learned", (1, 8, 8), 17, hidden=8, depth=1, decoder="network")
    groups = ex.param_groups(diffusion, settings)
    assert sum(len(g["params"]) for g in groups) == len(list(diffusion.parameters()))
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(diffusion.schedule.gamma_min)]["lr"] == 1e-2
    assert by_param[id(diffusion.denoiser.input.weight)]["weight_decay"] == 1e-4
    assert by_param[id(diffusion.decoder_log_scale)]["lr"] == 2e-3
    run = dict(steps=3, hidden=8, depth=1, eval_times=2, eval_steps=(), tuned=(-3.0, 4.0))
    frozen = ex.train_and_evaluate("learned", schedule_lr=0.0, **run)  # the optimizer applies the setting
    moved = ex.train_and_evaluate("learned", **run)
    assert (frozen["gamma_min"], frozen["gamma_max"]) == pytest.approx((-3.0, 4.0), abs=1e-6)
    assert abs(moved["gamma_min"] + 3.0) > 1e-4


def test_anchored_denoiser_sees_gamma_from_the_schedules_own_gamma_min():
    """``anchor=a``: the network's input is γ − γ(0) + a, so (i) with a fixed schedule whose
    γ(0) = a nothing changes, (ii) with a learned schedule the input at t = 0 is exactly a
    wherever γ_min has moved, and gradients reach both endpoints."""
    torch.manual_seed(11)
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLPDenoiser(2, hidden=16, depth=1, gamma_range=(-8.0, 8.0))

        def forward(self, z, level):
            seen.append(level.detach().clone())
            return self.net(z, level)

    x = (torch.rand(64, 2) * 2 - 1) * 0.8
    denoiser = Recorder()
    plain = Diffusion(denoiser, LinearGamma(-4.0, 2.0), (2,))
    anchored = Diffusion(denoiser, LinearGamma(-4.0, 2.0), (2,), anchor=-4.0)
    t = torch.rand(64, dtype=torch.float64)
    torch.manual_seed(0)
    a = ex.bound_terms(plain, x, t).total
    torch.manual_seed(0)
    b = ex.bound_terms(anchored, x, t).total
    assert torch.allclose(a, b)
    learned = LearnedGamma(-4.0, 2.0, hidden=8)
    with torch.no_grad():
        learned.gamma_min.fill_(-3.5)
    diffusion = Diffusion(denoiser, learned, (2,), anchor=-4.0, decoder="network")
    seen.clear()
    from pyro_diffusion.bound import decoder_term

    decoder_term(diffusion, x, learned.endpoints()[0])
    assert torch.allclose(seen[-1], torch.full((64,), -4.0))
    terms = ex.bound_terms(diffusion, x, t)
    terms.total.sum().backward()
    assert learned.gamma_min.grad is not None and learned.gamma_max.grad is not None
    with pytest.raises(ValueError, match="anchor"):
        Diffusion(denoiser, learned, (2,), anchor=float("nan"))
    assert "learned-anchored" in ex.CONFIGS
    result = ex.train_and_evaluate(
        "learned-anchored", steps=3, hidden=8, depth=1, eval_times=2, eval_steps=(), tuned=(-3.0, 4.0)
    )
    assert result["config"] == "learned-anchored" and math.isfinite(result["test_bpd_continuous"])


def test_learned_shape_config_freezes_the_endpoints_and_trains_the_shape():
    assert "learned-shape" in ex.CONFIGS
    frozen = ex.optim_args(2e-3, None, 1.0, freeze_endpoints=True)
    assert frozen("schedule.gamma_min")["lr"] == 0.0 and frozen("schedule.gamma_max")["lr"] == 0.0
    assert frozen("schedule.raw_out_weight")["lr"] == 2e-3
    assert frozen("denoiser.input.weight") == {"lr": 2e-3, "weight_decay": 1.0}
    run = dict(steps=5, hidden=8, depth=1, eval_times=2, eval_steps=(), tuned=(-3.0, 4.0))
    result = ex.train_and_evaluate("learned-shape", **run)
    assert (result["gamma_min"], result["gamma_max"]) == pytest.approx((-3.0, 4.0), abs=1e-9)
    still = ex.train_and_evaluate("learned-shape", schedule_lr=0.0, **run)  # the shape does not move
    moved = torch.tensor(result["gamma_curve"]) - torch.tensor(still["gamma_curve"])
    assert moved.abs().max() > 1e-5  # the shape trained (with schedule_lr = 0 it stays put)


def test_learned_heldout_trains_only_the_endpoints_on_the_held_out_images():
    assert "learned-heldout" in ex.CONFIGS
    with pytest.raises(ValueError, match="val_size"):
        ex.train_and_evaluate("learned-heldout", steps=2, hidden=8, depth=1, eval_times=2, eval_steps=())
    # one held-out step: the endpoints take one Adam step down the gradient of the bound on a
    # batch of the held-out images (the first Adam step is lr · sign(gradient)); nothing else moves
    denoiser = MLPDenoiser(2, hidden=16, depth=1, gamma_range=(-8.0, 8.0))
    diffusion = Diffusion(denoiser, LearnedGamma(-4.0, 2.0, hidden=8), (2,), anchor=-4.0)
    loss = DiffusionELBO(num_steps=0, times="low-discrepancy")
    val = (torch.rand(32, 2) * 2 - 1) * 0.8
    before = {n: p.detach().clone() for n, p in diffusion.named_parameters()}
    rows = torch.randint(0, 32, (16,), generator=torch.Generator().manual_seed(10_000 + 7))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        held = elbo_module(diffusion, loss)(val[rows]) / 16
        expected = torch.autograd.grad(held, [diffusion.schedule.gamma_min, diffusion.schedule.gamma_max])
    step = ex._heldout_endpoint_step(diffusion, loss, val, 16, 0.01, seed=7)
    torch.manual_seed(3)
    step()
    for name, param in diffusion.named_parameters():
        moved = (param.detach() - before[name]).abs().max().item()
        if name.endswith(("gamma_min", "gamma_max")):
            grad = expected[0] if name.endswith("gamma_min") else expected[1]
            assert param.detach() - before[name] == pytest.approx(-0.01 * grad.sign().item(), rel=1e-3)
            assert param.grad is None  # left clean for the main optimizer's next step
        else:
            assert moved == 0.0, name
    run = dict(steps=3, hidden=8, depth=1, eval_times=2, eval_steps=(), val_size=100, tuned=(-3.0, 4.0))
    result = ex.train_and_evaluate("learned-heldout", **run)
    assert result["config"] == "learned-heldout" and (result["gamma_min"], result["gamma_max"]) != (-3.0, 4.0)
    still = ex.train_and_evaluate("learned-heldout", schedule_lr=0.0, **run)  # held-out steps at lr 0
    assert (still["gamma_min"], still["gamma_max"]) == pytest.approx((-3.0, 4.0), abs=1e-9)


def test_experiment_trains_and_selects_on_a_discrete_bound(monkeypatch):
    """``train_num_steps = T`` (VDM's T intervals): the loss is the bound on T + 1 noise levels,
    checkpoints are selected on the T-interval validation bound, and the per-image test bounds
    are kept for every evaluated T."""
    loss = ex.make_loss("learned-shape", 16)
    assert isinstance(loss, DiffusionELBO) and loss.num_steps == 17 and not loss.minimize_variance
    assert loss.times == "low-discrepancy"
    continuous = ex.make_loss("learned-shape")
    assert isinstance(continuous, DiffusionELBO) and continuous.num_steps == 0
    assert ex.make_loss("learned-T16").num_steps == 17
    for config, value in (("simple", 16), ("learned-T16", 16), ("tuned", 0), ("tuned", 2.5)):
        with pytest.raises(ValueError, match="train_num_steps"):
            ex.make_loss(config, value)
    _, built, _ = ex.build("linear:-2:4", (64,), 17, hidden=8, depth=1, train_num_steps=8)
    assert isinstance(built, DiffusionELBO) and built.num_steps == 9
    validated = []
    original = engine.validation_bound

    def recording(diffusion, val, *, num_steps, num_times, **kwargs):
        validated.append(num_steps)
        return original(diffusion, val, num_steps=num_steps, num_times=num_times, **kwargs)

    monkeypatch.setattr(engine, "validation_bound", recording)  # the engine's validation
    run = dict(steps=4, hidden=8, depth=1, eval_times=3, val_size=40, eval_every=2, val_times=2)
    result = ex.train_and_evaluate("learned-shape", train_num_steps=4, eval_steps=(4, 16), **run)
    assert validated == [5, 5] and result["train_num_steps"] == 4  # T = 4 intervals: 5 levels
    for T in (4, 16):
        per_image = torch.tensor(result[f"test_per_image_bpd_T{T}"], dtype=torch.float64)
        assert per_image.shape == (297,) and len(result[f"test_per_image_se_T{T}"]) == 297
        assert math.isclose(per_image.mean().item(), result[f"test_bpd_T{T}"], rel_tol=1e-9)
    from pyro_diffusion.baselines import CategoricalMixture
    from pyro_diffusion.data import load_dataset

    dataset = load_dataset("digits")
    mixture = CategoricalMixture(dataset.num_levels, 5, seed=0).fit(dataset.train)
    at16 = ex.paired_comparison([result], dataset, mixture=mixture, num_steps=16)
    assert math.isclose(at16["diffusion_bpd"], result["test_bpd_T16"], rel_tol=1e-9)
    with pytest.raises(ValueError, match="test_per_image_bpd_T64"):
        ex.paired_comparison([result], dataset, mixture=mixture, num_steps=64)
    validated.clear()
    continuous = ex.train_and_evaluate("learned-shape", eval_steps=(), **run)
    assert validated == [0, 0] and "train_num_steps" not in continuous


def test_paired_over_seeds_gives_both_standard_errors():
    generator = torch.Generator().manual_seed(5)
    base = torch.rand(40, generator=generator, dtype=torch.float64) + 1.5  # per-image difficulty
    shift = {0: -0.01, 1: -0.03, 2: 0.005, 3: -0.02}  # per-seed effect of "first"
    first, second = [], []
    for seed, delta in shift.items():
        noise = 0.002 * torch.randn(40, generator=generator, dtype=torch.float64)
        first.append({"seed": seed, "test_per_image_bpd_T16": (base + delta + noise).tolist()})
        if seed != 3:  # seed 3 has no partner: left out
            second.append({"seed": seed, "test_per_image_bpd_T16": base.tolist()})
    result = ex.paired_over_seeds(first, second, num_steps=16)
    differences = torch.stack(
        [
            torch.tensor(f["test_per_image_bpd_T16"], dtype=torch.float64) - base
            for f in first
            if f["seed"] != 3
        ]
    )
    assert result["seeds"] == [0, 1, 2] and result["num_images"] == 40
    assert result["difference"] == pytest.approx(differences.mean().item(), abs=1e-12)
    assert result["per_seed"] == pytest.approx(differences.mean(1).tolist(), abs=1e-12)
    assert result["se_seeds"] == pytest.approx(differences.mean(1).std().item() / math.sqrt(3), rel=1e-9)
    assert result["se_images"] == pytest.approx(differences.mean(0).std().item() / math.sqrt(40), rel=1e-9)
    # the seed-to-seed spread (sd 0.018) dominates the per-image noise: the image SE misses it
    assert result["se_seeds"] > 3 * result["se_images"]
    assert result["images_better"] == int((differences.mean(0) < 0).sum())
    with pytest.raises(ValueError, match="test_per_image_bpd'"):
        ex.paired_over_seeds(first, second)  # no T = ∞ values in these results
    with pytest.raises(ValueError, match="no seed in common"):
        ex.paired_over_seeds(first[3:], second, num_steps=16)


def test_every_configuration_is_a_training_configuration_of_the_cli():
    """Each study configuration is a TrainConfig whose model is the one the study describes."""
    for name in ex.CONFIGS + ("linear:-1:3",):
        config = ex.study_config(name, tuned=(-3.0, 4.0))
        assert config.variance == "small" and config.clip_value == 10.0 and config.sampling == "replacement"
        assert config.loss_steps == (17 if name == "learned-T16" else 0) and config.times == "low-discrepancy"
        model = ex.make_diffusion(name, (1, 8, 8), 17, hidden=8, depth=1, tuned=(-3.0, 4.0))
        if name.startswith("learned"):
            assert isinstance(model.schedule, LearnedGamma) and model.schedule.in_bias.numel() == 256
            assert config.freeze_endpoints == (name in ("learned-shape", "learned-heldout"))
        assert (model.anchor == -3.0) == (name in ("learned-anchored", "learned-heldout"))
    cosine = ex.make_schedule("cosine")
    assert isinstance(cosine, NoiseSchedule)
    assert cosine.betas.max().item() == pytest.approx(0.999)  # Improved DDPM's clipping
    assert ex.make_schedule("vdm-linear").endpoints()[0].item() == pytest.approx(-13.3)


def test_the_weight_average_is_the_engines_and_ramps_its_decay():
    """The study's average is ``torch.optim.swa_utils.AveragedModel``: the first update
    copies, the n-th after it moves by 1 − min(decay, n / (n + 9))."""
    module = torch.nn.Linear(2, 1)
    average = ex._WeightAverage(module, 0.5)
    start = module.weight.detach().clone()
    assert torch.equal(average.shadow["weight"], start)
    with torch.no_grad():
        module.weight.add_(1.0)
    average.update()  # n = 1: decay min(0.5, 1/10) = 0.1, so 90 % of the way
    assert torch.allclose(average.shadow["weight"], start + 0.9)
    for _ in range(30):
        average.update()
    with torch.no_grad():
        module.weight.add_(1.0)
    before = average.shadow["weight"].clone()
    average.update()  # the decay has reached its cap 0.5
    assert torch.allclose(average.shadow["weight"], before + 0.5 * (module.weight - before))
    target = torch.nn.Linear(2, 1)
    average.copy_to(target)
    assert torch.equal(target.weight, average.shadow["weight"])
