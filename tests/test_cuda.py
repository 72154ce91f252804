"""GPU behaviour: device placement, dtypes, no host-device synchronization in the training
step and the sampling loop, autocast.  Every test needs CUDA and is skipped without it:
a GPU test runs on a GPU or not at all.
"""

from __future__ import annotations

import contextlib

import pyro
import pytest
import torch

from pyro_diffusion import (
    Diffusion,
    DiffusionELBO,
    GaussianDiffusion,
    LearnedGamma,
    MLPDenoiser,
    NoiseSchedule,
    SimplifiedLoss,
    UNetDenoiser,
    vlb_terms,
)

DEVICE = torch.device("cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _image_diffusion(**kwargs) -> GaussianDiffusion:
    torch.manual_seed(0)
    net = UNetDenoiser(1, base=16, multipliers=(1, 2))
    diffusion = GaussianDiffusion(
        net, NoiseSchedule.linear(100), (1, 8, 8), decoder="discretized", num_levels=17, **kwargs
    )
    return diffusion.to(DEVICE)


def _images(n: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 17, (n, 1, 8, 8), generator=generator)
    return (levels.float() / 8 - 1).to(DEVICE)


@contextlib.contextmanager
def _no_sync():
    """Raise on any host-device synchronization inside the block."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_schedule_buffers_follow_the_module_in_float64():
    diffusion = _image_diffusion()
    for name, buffer in diffusion.schedule.named_buffers():
        assert buffer.device.type == DEVICE.type, name
        assert buffer.dtype == torch.float64, name
    grid = diffusion.grid()
    assert grid.device.type == DEVICE.type and grid.dtype == torch.float64
    expected = torch.prod(1 - diffusion.schedule.betas[:7]).item()
    assert abs(diffusion.schedule.alphas_cumprod[6].item() - expected) < 1e-12
    respaced = diffusion.grid(10)
    assert respaced.device.type == DEVICE.type
    torch.testing.assert_close(respaced, grid[diffusion.schedule.subgrid_steps(10).to(DEVICE) - 1])


def test_loss_bound_and_samples_live_on_the_device_in_the_data_dtype():
    diffusion = _image_diffusion()
    x0 = _images()
    loss = DiffusionELBO()(diffusion.model_module(), diffusion.guide_module())(x0)
    assert loss.device.type == DEVICE.type and loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    for name, param in diffusion.named_parameters():
        assert param.grad is not None and param.grad.device.type == DEVICE.type, name
        assert torch.isfinite(param.grad).all(), name
    terms = vlb_terms(diffusion, x0)
    assert terms.shape == (x0.shape[0], diffusion.num_steps + 1)
    assert terms.device.type == DEVICE.type and terms.dtype == torch.float32
    assert torch.isfinite(terms).all()
    for method in ("ancestral", "ddim"):
        samples = diffusion.sample(4, method=method)
        assert samples.device.type == DEVICE.type and samples.dtype == torch.float32
        levels = (samples + 1) * 8  # the discretized decoder's mean is one of the 17 levels
        assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_continuous_time_loss_with_a_learned_schedule_on_the_device():
    torch.manual_seed(0)
    diffusion = Diffusion(
        UNetDenoiser(1, base=16, multipliers=(1, 2)),
        LearnedGamma(-6.0, 6.0, hidden=16),
        (1, 8, 8),
        num_levels=17,
    ).to(DEVICE)
    x0 = _images()
    loss = DiffusionELBO(num_steps=0, times="low-discrepancy")(
        diffusion.model_module(), diffusion.guide_module()
    )(x0)
    loss.backward()
    assert loss.device.type == DEVICE.type and torch.isfinite(loss)
    assert (
        diffusion.schedule.raw_out_weight.grad is not None and diffusion.schedule.gamma_min.grad is not None
    )
    assert diffusion.nll(x0, num_steps=0, num_times=4).device.type == DEVICE.type


@pytest.mark.parametrize(
    "loss",
    [
        DiffusionELBO(),
        DiffusionELBO(times="importance", warmup=1),
        DiffusionELBO(num_steps=0),
        SimplifiedLoss(),
    ],
)
def test_training_step_makes_no_host_device_sync(loss):
    pyro.enable_validation(False)  # validation reads tensor values (documented)
    diffusion = _image_diffusion()
    module = loss(diffusion.model_module(), diffusion.guide_module())
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    x0 = _images()

    def step():
        optimizer.zero_grad(set_to_none=True)
        value = module(x0)
        value.backward()
        optimizer.step()
        return value.detach()

    before = [p.detach().clone() for p in diffusion.parameters()]
    step()  # first step: registers the parameters, creates the optimizer state
    with _no_sync():
        losses = [step() for _ in range(3)]
    assert all(torch.isfinite(value) for value in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, diffusion.parameters()))


@pytest.mark.parametrize("method, num_steps", [("ancestral", None), ("ancestral", 10), ("ddim", 10)])
def test_sampling_loop_makes_no_host_device_sync(method, num_steps):
    pyro.enable_validation(False)  # validation reads the grid's values (documented)
    diffusion = _image_diffusion()
    x_T = torch.randn(4, 1, 8, 8, device=DEVICE)
    diffusion.sample(2, method=method, num_steps=num_steps)  # warm up
    with _no_sync():
        samples = diffusion.sample(4, method=method, num_steps=num_steps, x_T=x_T)
    assert samples.shape == (4, 1, 8, 8) and samples.device.type == DEVICE.type


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_the_bound_in_float32(dtype):
    if dtype == torch.float16 and DEVICE.type == "cpu":
        pytest.skip("float16 autocast is a GPU feature")
    x0 = _images(16)
    exact = _image_diffusion()
    mixed = _image_diffusion(autocast_dtype=dtype, name="mixed")
    mixed.load_state_dict(exact.state_dict())
    elbo = DiffusionELBO()
    values = {}
    for label, diffusion in (("exact", exact), ("mixed", mixed)):
        module = elbo(diffusion.model_module(), diffusion.guide_module())
        torch.manual_seed(3)  # same steps and noise for both
        values[label] = module(x0)
        values[label].backward()
    assert values["mixed"].dtype == torch.float32
    for param in mixed.parameters():
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32
        assert torch.isfinite(param.grad).all()
    # the network runs with ~3 (bf16) or ~4 (fp16) significant digits; the bound's arithmetic
    # is float32, so the loss moves by far less than a few per cent
    relative = ((values["mixed"] - values["exact"]).abs() / values["exact"].abs()).item()
    assert relative < 0.05
    mean_output, _ = mixed.denoise(x0, torch.full((16,), 0.5, dtype=torch.float64, device=DEVICE))
    assert mean_output.dtype == torch.float32
    terms = vlb_terms(mixed, x0)
    assert terms.dtype == torch.float32 and torch.isfinite(terms).all()


def test_mlp_on_two_dimensional_data_trains_on_the_device():
    pyro.enable_validation(False)
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(MLPDenoiser(2, hidden=32, depth=1), NoiseSchedule.linear(50), (2,)).to(
        DEVICE
    )
    x0 = torch.randn(64, 2, device=DEVICE)
    svi = pyro.infer.SVI(diffusion.model, diffusion.guide, pyro.optim.Adam({"lr": 1e-3}), DiffusionELBO())
    value = svi.step(x0)  # SVI.step returns a float: one read-back per step, by design
    assert isinstance(value, float) and value == value
