"""Training with SVI on 2-D data: the bound against the true entropy, sample quality, a plain
PyTorch loop over the ELBOModule; and the package's one training engine, which every trainer
of the package goes through."""

import ast
import copy
import math
import re
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributed as torch_dist
from pyro.infer import SVI
from pyro.optim import ClippedAdam

import pyro_diffusion
from _helpers import energy_distance
from pyro_diffusion import DiffusionELBO, GaussianDiffusion, MLPDenoiser, NoiseSchedule
from pyro_diffusion.data import GaussianMixture2D
from pyro_diffusion.training import elbo_module

T = 50
STEPS = 2000
BATCH = 256
MARGIN_NATS = 0.35  # stated margin: the trained bound is within 0.35 nats of the entropy


def new_diffusion(seed=0, hidden=128, depth=3):
    torch.manual_seed(seed)
    return GaussianDiffusion(MLPDenoiser(2, hidden=hidden, depth=depth), NoiseSchedule.linear(T), (2,))


@pytest.fixture(scope="module")
def trained():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    mixture = GaussianMixture2D()
    diffusion = new_diffusion()
    untrained = copy.deepcopy(diffusion)
    optim = ClippedAdam({"lr": 2e-3, "lrd": 0.01 ** (1 / STEPS), "clip_norm": 10.0})
    svi = SVI(diffusion.model, diffusion.guide, optim, DiffusionELBO())
    g = torch.Generator().manual_seed(1)
    losses = [svi.step(mixture.sample(BATCH, g)) / BATCH for _ in range(STEPS)]
    pyro.clear_param_store()
    return {"mixture": mixture, "diffusion": diffusion, "untrained": untrained, "losses": losses}


def test_training_reduces_the_loss(trained):
    losses = torch.tensor(trained["losses"])
    # the loss falls within tens of steps; the one-step estimate is noisy (the decoder, at
    # σ_1² = 1e-4, is one of its steps with weight T), so compare means with their errors
    first, last = losses[:10], losses[-200:]
    assert last.mean() < first.mean() - 4 * math.hypot(first.std() / 10**0.5, last.std() / 200**0.5)
    assert last.mean() < 4.0  # nats per datum; the untrained start is far above
    # and the whole bound (every step's term) on fresh data fell
    fresh = trained["mixture"].sample(2000, torch.Generator().manual_seed(3))
    before = trained["untrained"].vlb_terms(fresh).sum(1).mean().item()
    after = trained["diffusion"].vlb_terms(fresh).sum(1).mean().item()
    assert after < before - 1.0, (before, after)


def test_bound_on_fresh_data_is_above_the_entropy_and_close_to_it(trained):
    mixture, diffusion = trained["mixture"], trained["diffusion"]
    entropy, entropy_se = mixture.entropy(num_samples=200_000)
    g = torch.Generator().manual_seed(7)
    fresh = mixture.sample(4000, g)
    nll = diffusion.vlb_terms(fresh).sum(1).double()
    mean, se = nll.mean().item(), (nll.std() / math.sqrt(nll.numel())).item()
    print(f"bound {mean:.4f} ± {se:.4f} nats, entropy {entropy:.4f} ± {entropy_se:.4f}")
    # −ELBO ≥ −log p_θ(x) and E_p[−log p_θ] ≥ H(p): never below the entropy beyond sampling error
    assert mean > entropy - 4 * math.hypot(se, entropy_se), (mean, se, entropy)
    assert mean < entropy + MARGIN_NATS, (mean, se, entropy)


def test_samples_match_held_out_data_and_a_broken_model_fails(trained):
    mixture, diffusion = trained["mixture"], trained["diffusion"]
    g = torch.Generator().manual_seed(11)
    held_out = mixture.sample(1500, g)
    reference = energy_distance(mixture.sample(1500, g), held_out)  # two samples of the data itself
    threshold = 0.02
    torch.manual_seed(3)
    good = energy_distance(diffusion.sample(1500), held_out)
    broken = energy_distance(trained["untrained"].sample(1500), held_out)
    print(f"energy distance: data/data {reference:.4f}, model {good:.4f}, untrained {broken:.4f}")
    assert reference < threshold
    assert good < threshold, good
    assert broken > 5 * threshold, broken


def test_plain_pytorch_loop_over_the_elbo_module_trains_as_well_as_svi():
    """Same network, initialization, batches, step draws and Adam settings: SVI with
    pyro.optim.Adam against a torch.optim.Adam loop over the ELBOModule of DiffusionELBO()
    (``elbo_module``, which runs the programs with module-local parameters)."""
    steps, lr = 300, 2e-3
    mixture = GaussianMixture2D()
    base = new_diffusion(seed=5, hidden=64, depth=2)
    svi_diffusion, loop_diffusion = copy.deepcopy(base), copy.deepcopy(base)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(2)
    svi = SVI(svi_diffusion.model, svi_diffusion.guide, pyro.optim.Adam({"lr": lr}), DiffusionELBO())
    svi_losses = [svi.step(mixture.sample(BATCH, g)) / BATCH for _ in range(steps)]

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(2)
    module = elbo_module(loop_diffusion, DiffusionELBO())
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    loop_losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = module(mixture.sample(BATCH, g))
        loss.backward()
        optimizer.step()
        loop_losses.append(loss.item() / BATCH)
    assert len(pyro.get_param_store()) == 0  # nothing entered the global param store

    # both trained: the last 50 losses are far below the first 50
    for losses in (svi_losses, loop_losses):
        assert sum(losses[-50:]) < 0.5 * sum(losses[:50])
    # the same bound on held-out data within noise (common random numbers for the evaluation)
    held_out = mixture.sample(3000, torch.Generator().manual_seed(9))
    pyro.set_rng_seed(4)
    a = svi_diffusion.vlb_terms(held_out).sum(1).double()
    pyro.set_rng_seed(4)
    b = loop_diffusion.vlb_terms(held_out).sum(1).double()
    difference = a - b
    se = difference.std() / math.sqrt(difference.numel())
    print(f"held-out bound: SVI {a.mean():.4f}, plain loop {b.mean():.4f}, paired SE {se:.2e}")
    assert abs(difference.mean()) < 4 * se + 1e-6, (a.mean(), b.mean(), se)


# ---------------------------------------------------------------------------- one engine
PACKAGE = Path(pyro_diffusion.__file__).parent
#: optimizer steps in the package that do not train a diffusion
NOT_DIFFUSION_TRAINING = {
    "metrics.py": "fits the small digits classifier of the sample-quality metric",
    "inference/svi.py": "fits a variational posterior over x_0 given an observation",
}


def _step_calls() -> list[tuple[str, str]]:
    """Every ``<optimizer or svi>.step(...)`` call in the package's code (not its docstrings)."""
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "step"
            ):
                owner = ast.unparse(node.func.value)
                if re.search(r"optim|svi", owner, re.IGNORECASE):
                    calls.append((path.relative_to(PACKAGE).as_posix(), f"{owner}.step()"))
    return calls


def test_grep_finds_one_training_loop():
    """One place in the package takes an optimizer step of a diffusion: the engine's
    ``optimizer_step``, which ``Engine.run`` (the loop) calls through ``Engine.step``."""
    training = [call for call in _step_calls() if call[0] not in NOT_DIFFUSION_TRAINING]
    assert training == [("engine.py", "optimizer.step()")], training
    assert {call[0] for call in _step_calls()} - {"engine.py"} <= set(NOT_DIFFUSION_TRAINING)
    source = (PACKAGE / "engine.py").read_text()
    assert source.count("while self.step_count < target") == 1  # the loop
    for path in PACKAGE.rglob("*.py"):  # nobody else builds an SVI or a ClippedAdam to train
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func).split(".")[-1]
                if name in ("SVI", "ClippedAdam"):
                    assert path.relative_to(PACKAGE).as_posix() in NOT_DIFFUSION_TRAINING, path


def test_every_trainer_goes_through_the_engine(tmp_path, monkeypatch):
    """training.train, the schedule study (with its held-out endpoint hook), compare, the
    pretrained models and data-parallel training all run ``Engine.run`` and step through the
    engine's ``optimizer_step``."""
    from pyro_diffusion import engine
    from pyro_diffusion.distributed import data_parallel_module, data_parallel_step
    from pyro_diffusion.experiments import schedule_study as ex
    from pyro_diffusion.experiments.compare import run_comparison
    from pyro_diffusion.inference import pretrained
    from pyro_diffusion.training import TrainConfig, train

    counts = {"run": 0, "step": 0}
    run, step = engine.Engine.run, engine.optimizer_step

    def counting_run(self, *args, **kwargs):
        counts["run"] += 1
        return run(self, *args, **kwargs)

    def counting_step(*args, **kwargs):
        counts["step"] += 1
        return step(*args, **kwargs)

    monkeypatch.setattr(engine.Engine, "run", counting_run)
    monkeypatch.setattr(engine, "optimizer_step", counting_step)

    def took(runs, steps):
        assert (counts["run"], counts["step"]) == (runs, steps), counts
        counts.update(run=0, step=0)

    config = TrainConfig(steps=3, num_steps=10, hidden=8, depth=1, num_train=100, num_test=20, progress=False)
    train(config, tmp_path / "train", figures=False)
    took(1, 3)
    ex.train_and_evaluate(
        "learned-heldout", steps=2, hidden=8, depth=1, val_size=20, eval_times=2, eval_steps=()
    )
    took(1, 4)  # two training steps and two held-out endpoint steps
    run_comparison(
        config, tmp_path / "compare", objectives=["elbo"], seeds=[0], baselines=False, log=lambda _: None
    )
    took(1, 3)
    pretrained.train(pretrained.make_diffusion("gmm", 10), torch.randn(50, 2), num_steps=2, batch_size=8)
    took(1, 2)
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        diffusion = new_diffusion(hidden=8, depth=1)
        module = data_parallel_module(diffusion)
        data_parallel_step(module, torch.optim.SGD(module.parameters(), lr=1e-3), torch.randn(4, 2))
        took(0, 1)
        train(config, tmp_path / "ddp", figures=False)  # under torch.distributed: DDP, same engine
        took(1, 3)
    finally:
        torch_dist.destroy_process_group()
    assert torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["engine"]["world_size"] == 1
