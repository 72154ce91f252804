"""FusedOptim / FusedAdam: one torch optimizer for all of SVI's parameters (issue 3)."""

import copy
import io

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI

from pyro_diffusion import (
    FusedAdam,
    FusedOptim,
    GaussianDiffusion,
    MLPDenoiser,
    NoiseSchedule,
    StepSubsampledELBO,
)


def _diffusion(name="d"):
    torch.manual_seed(1)
    return GaussianDiffusion(MLPDenoiser(2, hidden=16, depth=2), NoiseSchedule.linear(20), (2,), name=name)


X0 = torch.linspace(-1, 1, 32).reshape(16, 2)


def _train(diffusion, optim, steps, seed=0):
    pyro.set_rng_seed(seed)
    svi = SVI(diffusion.model, diffusion.guide, optim, StepSubsampledELBO())
    return [svi.step(X0) for _ in range(steps)]


def _params(diffusion):
    return {n: p.detach().clone() for n, p in diffusion.named_parameters()}


def _assert_same(a, b, rtol=1e-6, atol=1e-7):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize(
    "args, to_none",
    [
        ({"lr": 1e-2}, True),
        ({"lr": 1e-2}, False),
        ({"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 1e-3, "foreach": True}, True),
    ],
    ids=["default", "keep-grads", "foreach+wd"],
)
def test_same_trajectory_as_pyro_adam(args, to_none):
    reference, fused = _diffusion("reference"), _diffusion("fused")
    _assert_same(_params(reference), _params(fused))
    losses_ref = _train(reference, pyro.optim.Adam(dict(args)), 5)
    optim = FusedAdam(dict(args), set_grads_to_none=to_none)
    losses_fused = _train(fused, optim, 5)
    assert losses_ref == pytest.approx(losses_fused, rel=1e-5)
    _assert_same(_params(reference), _params(fused))
    start = _params(_diffusion())
    assert all(not torch.equal(v, start[k]) for k, v in _params(fused).items())  # it did move
    assert len(optim.optimizer.param_groups) == 1
    assert len(optim.optimizer.param_groups[0]["params"]) == len(list(fused.parameters()))
    for p in fused.parameters():  # SVI's zero_grads leaves zeros unless the optimizer let go
        assert p.grad is None if to_none else torch.count_nonzero(p.grad) == 0


def _manual_params():
    a = pyro.param("a", torch.tensor([1.0, -2.0, 3.0]))
    b = pyro.param("b", torch.tensor([[0.5, 0.25], [-1.0, 2.0]]))
    return a.unconstrained(), b.unconstrained()


def _set_grads(params, step):
    for i, p in enumerate(params):
        p.grad = (
            torch.full_like(p, 10.0 * (i + 1)) * torch.arange(1, p.numel() + 1).reshape(p.shape) / (step + 1)
        )


def test_lrd_and_clip_norm_against_a_hand_written_loop():
    lr, lrd, clip = 0.1, 0.9, 1.0
    params = _manual_params()
    mirror = [p.detach().clone().requires_grad_() for p in params]
    optim = FusedAdam({"lr": lr}, clip_norm=clip, lrd=lrd, set_grads_to_none=False)
    torch_adam = torch.optim.Adam(mirror, lr=lr)
    for step in range(4):
        _set_grads(params, step)
        _set_grads(mirror, step)
        optim(set(params))
        assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])) <= clip * (1 + 1e-5)
        torch.nn.utils.clip_grad_norm_(mirror, clip)
        torch_adam.param_groups[0]["lr"] = lr * lrd ** (step + 1)  # decayed before each step
        torch_adam.step()
        for p, q in zip(params, mirror):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert optim.optimizer.param_groups[0]["lr"] == pytest.approx(lr * lrd**4)


def test_parameters_not_in_the_call_are_left_alone():
    a, b = _manual_params()
    optim = FusedAdam({"lr": 0.1})
    _set_grads((a, b), 0)
    optim({a, b})
    b_before, b_steps = b.detach().clone(), optim.optimizer.state[b]["step"].clone()
    b_grad = b.grad
    _set_grads((a,), 1)
    a_before = a.detach().clone()
    optim([a])  # a list works too
    assert not torch.equal(a.detach(), a_before)
    assert torch.equal(b.detach(), b_before)
    assert torch.equal(optim.optimizer.state[b]["step"], b_steps)
    assert b.grad is b_grad  # handed back after the step
    assert a.grad is None  # set_grads_to_none: only the stepped parameters


def test_new_parameters_join_later():
    def model_a():
        pyro.sample(
            "y", pyro.distributions.Normal(pyro.param("a", torch.tensor(0.0)), 1.0), obs=torch.tensor(3.0)
        )

    def model_ab():
        loc = pyro.param("a", torch.tensor(0.0)) + pyro.param("b", torch.tensor(0.0))
        pyro.sample("y", pyro.distributions.Normal(loc, 1.0), obs=torch.tensor(3.0))

    def guide():
        pass

    optim = FusedAdam({"lr": 0.1})
    svi_a = SVI(model_a, guide, optim, pyro.infer.Trace_ELBO())
    for _ in range(3):
        svi_a.step()
    assert pyro.param("a").item() > 0.2
    svi_ab = SVI(model_ab, guide, optim, pyro.infer.Trace_ELBO())
    for _ in range(3):
        svi_ab.step()
    assert pyro.param("b").item() > 0.2  # the new parameter is optimized
    groups = optim.optimizer.param_groups
    assert len(groups) == 2 and [len(g["params"]) for g in groups] == [1, 1]
    state = optim.get_state()
    assert state["a"]["state"][0]["step"].item() == 6
    assert state["b"]["state"][0]["step"].item() == 3


def test_state_round_trip_resumes_exactly(tmp_path):
    # uninterrupted: 3 + 3 steps, with a checkpoint after the first 3
    optim = FusedAdam({"lr": 1e-2}, lrd=0.99)
    straight = _diffusion()
    _train(straight, optim, 3, seed=0)
    model_state = copy.deepcopy(straight.state_dict())
    buffer = io.BytesIO()
    torch.save({"optim": optim.get_state()}, buffer)  # as pyro_diffusion.training checkpoints it
    optim.save(tmp_path / "optim.pt")
    rng = torch.get_rng_state()
    _train(straight, optim, 3, seed=1)
    expected = _params(straight)

    # resumed, as training.py does: a fresh optimizer given the state before its first step
    for restore in ("set_state", "load"):
        pyro.clear_param_store()
        resumed = _diffusion()
        resumed.load_state_dict(model_state)
        optim = FusedAdam({"lr": 1e-2}, lrd=0.99)
        if restore == "set_state":
            buffer.seek(0)
            optim.set_state(torch.load(buffer, weights_only=True)["optim"])  # plain data
        else:
            optim.load(tmp_path / "optim.pt")
        torch.set_rng_state(rng)
        _train(resumed, optim, 3, seed=1)
        _assert_same(_params(resumed), expected, rtol=0, atol=0)
        assert optim.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.99**6)


def test_state_is_interchangeable_with_pyro_adam():
    # pyro.optim.Adam for 3 steps, then each optimizer continues from its state for 3 more
    ref = _diffusion()
    pyro_adam = pyro.optim.Adam({"lr": 1e-2})
    _train(ref, pyro_adam, 3)
    # (PyroOptim.get_state aliases the live moment tensors: copy before stepping on)
    saved, model_state = copy.deepcopy(pyro_adam.get_state()), copy.deepcopy(ref.state_dict())
    _train(ref, pyro_adam, 3, seed=1)
    expected = _params(ref)
    pyro.clear_param_store()
    other = _diffusion()
    other.load_state_dict(model_state)
    fused = FusedAdam({"lr": 1e-2})
    fused.set_state(saved)
    _train(other, fused, 3, seed=1)
    _assert_same(_params(other), expected)
    # and back: FusedAdam's state read by pyro.optim.Adam
    back = pyro.optim.Adam({"lr": 1e-2})
    back.set_state(fused.get_state())
    assert set(fused.get_state()) == set(saved)
    _train(other, back, 1, seed=2)
    assert all(s["state"][0]["step"].item() == 7 for s in back.get_state().values())


def test_set_state_on_known_parameters_applies_at_once_and_get_state_is_a_snapshot():
    d = _diffusion()
    optim = FusedAdam({"lr": 1e-2})
    _train(d, optim, 2)
    saved = optim.get_state()
    first = next(iter(saved))
    exp_avg = saved[first]["state"][0]["exp_avg"].clone()
    _train(d, optim, 2, seed=1)
    assert torch.equal(saved[first]["state"][0]["exp_avg"], exp_avg)  # not aliased
    assert optim.get_state()[first]["state"][0]["step"].item() == 4
    optim.set_state(saved)
    now = optim.get_state()
    assert now.keys() == saved.keys()
    for name in saved:
        assert now[name]["state"][0]["step"].item() == 2
        torch.testing.assert_close(now[name]["state"][0]["exp_avg"], saved[name]["state"][0]["exp_avg"])
    _train(d, optim, 1, seed=2)  # still steps every parameter, in one group
    assert len(optim.optimizer.param_groups) == 1
    assert all(s["state"][0]["step"].item() == 3 for s in optim.get_state().values())


def test_per_parameter_args_give_param_groups():
    a, b = _manual_params()
    optim = FusedAdam(lambda name: {"lr": 0.5 if name == "a" else 0.0})
    _set_grads((a, b), 0)
    b_before = b.detach().clone()
    optim({a, b})
    assert torch.equal(b.detach(), b_before)
    assert sorted(g["lr"] for g in optim.optimizer.param_groups) == [0.0, 0.5]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="optim_constructor: expected a torch.optim.Optimizer subclass"):
        FusedOptim(torch.nn.Linear, {"lr": 1e-3})
    with pytest.raises(TypeError, match="optim_args: expected a dict"):
        FusedAdam([1e-3])
    with pytest.raises(ValueError, match="optim_args: Adam refuses .*learning rate"):
        FusedAdam({"lr": -1.0})
    with pytest.raises(TypeError, match="optim_args: Adam refuses .*lrr"):
        FusedAdam({"lrr": 1e-3})
    with pytest.raises(
        ValueError, match=r"'lrd' is not an argument of Adam; pass it as FusedOptim\(\.\.\., lrd="
    ):
        FusedAdam({"lr": 1e-3, "lrd": 0.99})
    with pytest.raises(ValueError, match="must not contain 'params'"):
        FusedAdam({"params": [], "lr": 1e-3})
    for bad in (0, -1.0, float("inf"), "1", True):
        with pytest.raises(ValueError, match="clip_norm: expected a positive finite number"):
            FusedAdam({"lr": 1e-3}, clip_norm=bad)
    for bad in (0, float("nan"), None):
        with pytest.raises(ValueError, match="lrd: expected a positive finite number"):
            FusedAdam({"lr": 1e-3}, lrd=bad)
    with pytest.raises(TypeError, match="set_grads_to_none: expected a bool"):
        FusedAdam({"lr": 1e-3}, set_grads_to_none="yes")
    optim = FusedAdam({"lr": 1e-3})
    with pytest.raises(TypeError, match="set_state: expected"):
        optim.set_state([1, 2])
    a, _ = _manual_params()
    a.grad = torch.ones_like(a)
    with pytest.raises(TypeError, match="optim_args: the callable must return a dict"):
        FusedAdam(lambda name: 1e-3)({a})
    loose = torch.zeros(2, requires_grad=True)  # not in the param store
    optim({loose})
    with pytest.raises(RuntimeError, match="not in Pyro's param store"):
        optim.get_state()


def test_training_checkpoints_resume_with_fused_adam(tmp_path, monkeypatch):
    # pyro_diffusion.training keeps optim.get_state() in its checkpoint and calls set_state on
    # resume before the first step; with FusedAdam in place of its PyroOptim, an interrupted
    # and resumed run must still equal the uninterrupted one
    from pyro_diffusion import training

    def fused(config):
        return FusedAdam({"lr": config.lr}, lrd=config.lr_final_fraction ** (1.0 / config.steps))

    monkeypatch.setattr(training, "make_optim", fused)
    config = training.TrainConfig(
        data="moons", objective="elbo", steps=12, batch_size=16, num_steps=10, hidden=16, depth=1,
        num_train=64, num_test=16, checkpoint_every=5, lr_final_fraction=0.5, progress=False,
    )  # fmt: skip
    whole = training.train(config, tmp_path / "whole", figures=False)
    training.train(config, tmp_path / "part", stop_after=7, figures=False)
    resumed = training.train(config, tmp_path / "part", resume=True, figures=False)
    assert resumed["loss_history"] == whole["loss_history"]
    load = lambda run: torch.load(run / training.CHECKPOINT, weights_only=False)  # noqa: E731
    a, b = load(tmp_path / "whole"), load(tmp_path / "part")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    lrs = [s["param_groups"][0]["lr"] for s in b["optim"].values()]
    assert lrs and all(lr == pytest.approx(config.lr * 0.5) for lr in lrs)  # decayed over all 12 steps


def test_training_uses_fused_adam_with_pyro_adams_updates(tmp_path, monkeypatch):
    # training.make_optim's plain-Adam path is FusedAdam: the same run as with pyro.optim.Adam,
    # to the bit, and a checkpoint written by either resumes with the other
    from pyro_diffusion import training

    config = training.TrainConfig(
        data="moons", objective="elbo", steps=12, batch_size=16, num_steps=10, hidden=16, depth=1,
        num_train=64, num_test=16, checkpoint_every=5, progress=False,
    )  # fmt: skip
    assert isinstance(training.make_optim(config), FusedOptim)
    fused = training.train(config, tmp_path / "fused", figures=False)
    with monkeypatch.context() as patch:
        patch.setattr(training, "make_optim", lambda c: pyro.optim.Adam({"lr": c.lr}))
        reference = training.train(config, tmp_path / "pyro", figures=False)
        training.train(config, tmp_path / "mixed", stop_after=7, figures=False)  # pyro.optim.Adam
    mixed = training.train(config, tmp_path / "mixed", resume=True, figures=False)  # FusedAdam
    assert fused["loss_history"] == reference["loss_history"] == mixed["loss_history"]
    load = lambda run: torch.load(run / training.CHECKPOINT, weights_only=False)  # noqa: E731
    a, b, c = load(tmp_path / "fused"), load(tmp_path / "pyro"), load(tmp_path / "mixed")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
        assert torch.equal(a["model"][name], c["model"][name]), name
