"""Training runs: interrupted + resumed equals uninterrupted; checkpoints refused when they
belong to another configuration; files written atomically and loadable with
``weights_only=True``."""

import json

import pytest
import torch

from pyro_diffusion.training import (
    CHECKPOINT,
    OBJECTIVES,
    ConfigMismatchError,
    TrainConfig,
    atomic_save,
    load_run,
    train,
)


def tiny(objective="elbo", **changes):
    values = dict(
        data="moons",
        objective=objective,
        steps=24,
        batch_size=32,
        num_steps=20,
        hidden=16,
        depth=1,
        num_train=200,
        num_test=50,
        checkpoint_every=8,
        progress=False,
    )
    values.update(changes)
    return TrainConfig(**values)


def weights(run_dir):
    return torch.load(run_dir / CHECKPOINT, weights_only=True)["engine"]["model"]


@pytest.mark.parametrize(
    "objective, changes",
    [("elbo-is", {}), ("hybrid", {}), ("elbo", {"schedule": "learned", "lr_final_fraction": 0.1})],
    ids=["elbo-is", "hybrid", "learned-schedule-lr-decay"],
)
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, objective, changes):
    # elbo-is carries state of its own (the running ℓ_t² history), hybrid learns variances, and
    # a learned schedule with a decaying learning rate has schedule parameters and an LR schedule
    config = tiny(objective, steps=40, checkpoint_every=7, **changes)
    whole = train(config, tmp_path / "whole", figures=False)
    # stop after 17 steps: the last checkpoint is at step 17 (the stop), 14 and 7 before it
    part = train(config, tmp_path / "part", stop_after=17, figures=False)
    assert part["steps"] == 17 and not part["finished"]
    # unrelated use of the global RNG between the two processes must not matter
    torch.rand(1000)
    resumed = train(config, tmp_path / "part", resume=True, figures=False)
    assert resumed["steps"] == whole["steps"] == 40
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["loss_history"] == whole["loss_history"]
    # and the run really trained: the parameters moved from their initial values
    start = train(tiny(objective, steps=1, **changes), tmp_path / "start", figures=False)
    assert start["steps"] == 1
    moved = [not torch.equal(a[n], weights(tmp_path / "start")[n]) for n in a]
    assert any(moved)


def test_resume_extends_a_finished_run_with_more_steps(tmp_path):
    train(tiny(steps=16), tmp_path / "a", figures=False)
    more = train(tiny(steps=24), tmp_path / "a", resume=True, figures=False)
    train(tiny(steps=24), tmp_path / "b", figures=False)
    assert more["steps"] == 24
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    train(tiny(steps=8), tmp_path / "run", figures=False)
    with pytest.raises(ConfigMismatchError, match=r"lr: checkpoint has 0.001, asked for 0.01"):
        train(tiny(steps=16, lr=1e-2), tmp_path / "run", resume=True, figures=False)
    with pytest.raises(ConfigMismatchError, match="objective"):
        train(tiny("simple", steps=16), tmp_path / "run", resume=True, figures=False)


def test_existing_checkpoint_needs_resume_and_resume_needs_checkpoint(tmp_path):
    train(tiny(steps=8), tmp_path / "run", figures=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny(steps=8), tmp_path / "run", figures=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny(steps=8), tmp_path / "empty", resume=True, figures=False)


def test_run_directory_contents(tmp_path):
    config = tiny(steps=16)
    metrics = train(config, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["objective"] == "elbo" and saved["steps"] == 16 and saved["schedule"] == "linear"
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["steps"] == 16 == len(on_disk["loss_history"]) == len(metrics["loss_history"])
    assert all(torch.isfinite(torch.tensor(on_disk["loss_history"])))
    for figure in ("loss.png", "samples.png"):
        assert (tmp_path / "run" / figure).stat().st_size > 1000
    # no temporary files are left behind by the atomic writes
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    loaded_config, diffusion, dataset = load_run(tmp_path / "run")
    assert loaded_config.objective == "elbo" and diffusion.num_steps == 20
    assert dataset.event_shape == (2,)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_objectives_registry_entries_are_usable():
    assert set(OBJECTIVES) >= {"elbo", "elbo-is", "simple", "hybrid"}
    assert OBJECTIVES["hybrid"].variance == "learned"
    assert OBJECTIVES["elbo"].is_bound and not OBJECTIVES["simple"].is_bound
    assert OBJECTIVES["elbo-is"].make_loss().importance


def test_bad_configuration_names_the_field():
    with pytest.raises(ValueError, match="objective: expected one of"):
        tiny("nope").validate()
    with pytest.raises(ValueError, match="steps: expected a positive integer"):
        tiny(steps=0).validate()
    with pytest.raises(ValueError, match="log_snr_max, log_snr_min"):
        tiny(log_snr_max=-10.0).validate()


def test_a_checkpoint_holding_other_objects_is_refused_not_unpickled(tmp_path):
    import numpy as np

    train(tiny(steps=4), tmp_path / "run", figures=False)
    torch.save({"rng": np.random.get_state()}, tmp_path / "run" / CHECKPOINT)  # a numpy array inside
    with pytest.raises(ValueError, match=r"checkpoint\.pt holds objects other than tensors"):
        load_run(tmp_path / "run")
