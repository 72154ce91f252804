"""Bad input raises a clear error naming the argument."""

import pytest
import torch

from pyro_diffusion import (
    Diffusion,
    DiffusionELBO,
    GaussianDiffusion,
    HybridLoss,
    LinearGamma,
    MLPDenoiser,
    NoiseSchedule,
    SimplifiedLoss,
    StepDraw,
    StepIndexed,
    bound,
)


@pytest.fixture
def diffusion():
    return GaussianDiffusion(MLPDenoiser(2, hidden=16, depth=1), NoiseSchedule.linear(10), (2,))


def with_draw(make_draw):
    loss = DiffusionELBO()
    loss.make_draw = make_draw
    return loss


def test_nan_data(diffusion):
    x0 = torch.tensor([[0.0, float("nan")]])
    for call in (diffusion.model, diffusion.guide, diffusion.vlb_terms, diffusion.nll):
        with pytest.raises(ValueError, match="x0: contains NaN"):
            call(x0)
    with pytest.raises(ValueError, match="x0: contains NaN"):
        DiffusionELBO().loss(diffusion.model, diffusion.guide, x0)


def test_wrong_event_shape(diffusion):
    with pytest.raises(ValueError, match=r"x0: expected shape \(batch, 2\)"):
        diffusion.model(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x0: expected shape"):
        DiffusionELBO().loss(diffusion.model, diffusion.guide, torch.zeros(4, 2, 1))
    with pytest.raises(ValueError, match="z: expected trailing shape"):
        diffusion.denoise(torch.zeros(4, 3), torch.zeros(4, dtype=torch.float64))


def test_integer_data(diffusion):
    with pytest.raises(TypeError, match="x0: expected a floating-point tensor"):
        diffusion.guide(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="x0: expected a torch.Tensor"):
        diffusion.vlb_terms([[0.0, 0.0]])


def test_fixed_steps_out_of_range(diffusion):
    x0 = torch.zeros(3, 2)
    for index in (torch.tensor([0, 3, 4]), torch.tensor([11, 3, 4])):
        with pytest.raises(ValueError, match=r"index: steps must lie in 1\.\.10"):
            with_draw(lambda index=index: StepDraw(index=index)).loss(diffusion.model, diffusion.guide, x0)
    for index in (torch.tensor([1, 2]), torch.tensor([1.0, 2.0, 3.0])):
        with pytest.raises(ValueError, match="index: expected a LongTensor of shape"):
            with_draw(lambda index=index: StepDraw(index=index)).loss(diffusion.model, diffusion.guide, x0)
    plain = Diffusion(MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(10), (2,), name="plain")
    with pytest.raises(ValueError, match=r"index: steps must lie in 2\.\.10"):  # the decoder is not a step
        with_draw(lambda: StepDraw(index=torch.tensor([1, 2, 3]))).loss(plain.model, plain.guide, x0)
    for u in (torch.tensor([1.5, 0.3, 0.3]), torch.tensor([0.5, 0.3])):
        with pytest.raises(ValueError, match="times_values"):
            with_draw(lambda u=u: StepDraw(times_values=u)).loss(diffusion.model, diffusion.guide, x0)


def test_step_draws_are_single_use(diffusion):
    draw = StepDraw()
    diffusion.guide(torch.zeros(3, 2), steps=draw)
    with pytest.raises(ValueError, match="steps: this StepDraw was already used"):
        diffusion.guide(torch.zeros(4, 2), steps=draw)
    with pytest.raises(ValueError, match="times"):
        StepDraw("bogus")
    with pytest.raises(ValueError, match="x0"):
        diffusion.model(None, steps=StepDraw())


def test_mismatched_device(diffusion):
    meta = torch.zeros(4, 2, device="meta")
    with pytest.raises(ValueError, match="x0: is on meta but the diffusion is on cpu"):
        diffusion.guide(meta)


def test_bad_configuration():
    net, schedule = MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(5)
    with pytest.raises(ValueError, match="mean"):
        GaussianDiffusion(net, schedule, (2,), mean="score")
    with pytest.raises(ValueError, match="variance"):
        GaussianDiffusion(net, schedule, (2,), variance="fixed")
    with pytest.raises(ValueError, match="num_levels"):
        GaussianDiffusion(net, schedule, (2,), decoder="discretized")
    with pytest.raises(ValueError, match="decoder"):
        GaussianDiffusion(net, schedule, (2,), decoder="plain")
    with pytest.raises(ValueError, match="event_shape"):
        GaussianDiffusion(net, schedule, ())
    with pytest.raises(TypeError, match="schedule"):
        GaussianDiffusion(net, [0.1, 0.2], (2,))
    with pytest.raises(TypeError, match="schedule"):
        GaussianDiffusion(net, LinearGamma(), (2,))
    with pytest.raises(TypeError, match="denoiser"):
        Diffusion(lambda z, g: z, schedule, (2,))
    for bad, argument in (
        ({"num_steps": 0}, "num_steps"),
        ({"guide_order": "sideways"}, "guide_order"),
        ({"autocast_dtype": torch.float64}, "autocast_dtype"),
        ({"anchor": True}, "anchor"),
        ({"num_levels": 1}, "num_levels"),
    ):
        with pytest.raises(ValueError, match=argument):
            Diffusion(net, LinearGamma(), (2,), **bad)
    with pytest.raises(TypeError, match="schedule"):
        StepIndexed(net, LinearGamma())
    with pytest.raises(TypeError, match="network"):
        StepIndexed(lambda x, t: x, schedule)


def test_bad_loss_and_bound_arguments(diffusion):
    x0 = torch.zeros(3, 2)
    for make, argument in (
        (lambda: DiffusionELBO(num_steps=-1), "num_steps"),
        (lambda: DiffusionELBO(num_steps=2.0), "num_steps"),
        (lambda: DiffusionELBO(warmup=-1), "warmup"),
        (lambda: DiffusionELBO(decay=1.0), "decay"),
        (lambda: DiffusionELBO(uniform_mix=0.0), "uniform_mix"),
        (lambda: SimplifiedLoss(times="sorted"), "times"),
        (lambda: HybridLoss(vlb_weight=-1.0), "vlb_weight"),
        (lambda: diffusion.vlb_terms(x0, steps_per_call=0), "steps_per_call"),
        (lambda: diffusion.vlb_terms(x0, max_items=0), "max_items"),
        (lambda: diffusion.nll(x0, num_steps=-1), "num_steps"),
        (lambda: bound(diffusion, x0, num_times=1), "num_times"),
        (lambda: diffusion.guide(x0, order="sideways"), "order"),
        (lambda: diffusion.grid(0), "num_steps"),
    ):
        with pytest.raises(ValueError, match=argument):
            make()
    one_level = Diffusion(MLPDenoiser(2, hidden=8, depth=1), LinearGamma(), (2,), num_steps=1, name="one")
    with pytest.raises(ValueError, match="num_steps: a 'plain' decoder"):
        DiffusionELBO().loss(one_level.model, one_level.guide, x0)


def test_denoiser_output_of_the_wrong_size():
    d = GaussianDiffusion(
        MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(5), (2,), variance="learned"
    )
    with pytest.raises(ValueError, match=r"denoiser: returned shape \(3, 2\), expected \(3, 4\)"):
        d.vlb_terms(torch.zeros(3, 2))


def test_generation_needs_a_sample_count(diffusion):
    with pytest.raises(ValueError, match="num_samples"):
        diffusion.model()
    with pytest.raises(ValueError, match="num_samples"):
        diffusion.model(num_samples=True)
    with pytest.raises(ValueError, match="x0"):
        diffusion.guide(None)


def test_stale_parameters_in_the_param_store_are_refused():
    first = GaussianDiffusion(MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(5), (2,))
    first.model(torch.zeros(3, 2))
    second = GaussianDiffusion(MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(5), (2,))
    with pytest.raises(RuntimeError, match="param store already holds"):
        second.model(torch.zeros(3, 2))
    renamed = GaussianDiffusion(
        MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(5), (2,), name="other"
    )
    renamed.model(torch.zeros(3, 2))
