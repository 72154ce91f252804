"""Bad input raises a clear error naming the argument (issue 2, item 7)."""

import pytest
import torch

from pyro_diffusion import GaussianDiffusion, MLPDenoiser, NoiseSchedule, StepSubsampledELBO


@pytest.fixture
def diffusion():
    return GaussianDiffusion(MLPDenoiser(2, hidden=16, depth=1), NoiseSchedule.linear(10), (2,))


def test_nan_data(diffusion):
    x0 = torch.tensor([[0.0, float("nan")]])
    for call in (diffusion.model, diffusion.guide, diffusion.vlb_terms):
        with pytest.raises(ValueError, match="x0: contains NaN"):
            call(x0)


def test_wrong_event_shape(diffusion):
    with pytest.raises(ValueError, match=r"x0: expected shape \(batch, 2\)"):
        diffusion.model(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x0: expected shape"):
        StepSubsampledELBO().loss(diffusion.model, diffusion.guide, torch.zeros(4, 2, 1))


def test_integer_data(diffusion):
    with pytest.raises(TypeError, match="x0: expected a floating-point tensor"):
        diffusion.guide(torch.zeros(4, 2, dtype=torch.long))


def test_steps_out_of_range(diffusion):
    with pytest.raises(ValueError, match=r"t: steps must lie in 1\.\.10"):
        diffusion.check_steps(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"t: steps must lie in 1\.\.10"):
        diffusion.check_steps(torch.tensor([11]))
    with pytest.raises(TypeError, match="t: expected a LongTensor"):
        diffusion.check_steps(torch.tensor([1.0]))


def test_mismatched_device(diffusion):
    meta = torch.zeros(4, 2, device="meta")
    with pytest.raises(ValueError, match="x0: is on meta but the diffusion is on cpu"):
        diffusion.guide(meta)


def test_bad_configuration():
    net, schedule = MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(5)
    with pytest.raises(ValueError, match="mean"):
        GaussianDiffusion(net, schedule, (2,), mean="v")
    with pytest.raises(ValueError, match="variance"):
        GaussianDiffusion(net, schedule, (2,), variance="fixed")
    with pytest.raises(ValueError, match="num_levels"):
        GaussianDiffusion(net, schedule, (2,), decoder="discretized")
    with pytest.raises(ValueError, match="event_shape"):
        GaussianDiffusion(net, schedule, ())
    with pytest.raises(TypeError, match="schedule"):
        GaussianDiffusion(net, [0.1, 0.2], (2,))


def test_denoiser_output_of_the_wrong_size():
    d = GaussianDiffusion(
        MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(5), (2,), variance="learned"
    )
    with pytest.raises(ValueError, match=r"denoiser: returned shape \(15, 2\), expected \(15, 4\)"):
        d.vlb_terms(torch.zeros(3, 2))


def test_generation_needs_a_sample_count(diffusion):
    with pytest.raises(ValueError, match="num_samples"):
        diffusion.model()
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
