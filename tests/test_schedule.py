import math

import pytest
import torch

from pyro_diffusion import NoiseSchedule


def test_linear_endpoints_and_derived_quantities():
    s = NoiseSchedule.linear(1000)
    assert s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    cumprod = torch.cumprod(1 - s.betas, 0)
    torch.testing.assert_close(s.alphas_cumprod, cumprod, rtol=1e-12, atol=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    torch.testing.assert_close(s.posterior_variance, s.betas * (1 - prev) / (1 - cumprod), rtol=1e-12, atol=0)
    assert s.posterior_variance[0].item() == 0.0
    # DDPM clipping: log β̃ at t = 1 is replaced by log β̃_2
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(
        math.log(s.posterior_variance[1].item())
    )
    torch.testing.assert_close(
        s.posterior_mean_coef_x0, prev.sqrt() * s.betas / (1 - cumprod), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        s.posterior_mean_coef_xt, (1 - s.betas).sqrt() * (1 - prev) / (1 - cumprod), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(s.log_snr, torch.log(cumprod / (1 - cumprod)), rtol=1e-10, atol=1e-12)


def test_cosine_matches_its_alpha_bar():
    T, offset = 200, 0.008
    s = NoiseSchedule.cosine(T, offset=offset)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = torch.cos((t / T + offset) / (1 + offset) * math.pi / 2) ** 2
    f0 = math.cos(offset / (1 + offset) * math.pi / 2) ** 2
    # away from the clipped last steps ᾱ_t = f(t)/f(0)
    torch.testing.assert_close(s.alphas_cumprod[: T - 5], (f / f0)[: T - 5], rtol=1e-10, atol=1e-12)
    assert (s.betas <= 0.999).all()


def test_short_linear_schedule_stays_valid():
    s = NoiseSchedule.linear(10)
    assert (s.betas < 1).all() and s.num_steps == 10


def test_from_log_snr_round_trips():
    s = NoiseSchedule.cosine(50)
    again = NoiseSchedule.from_log_snr(s.log_snr)
    torch.testing.assert_close(again.betas, s.betas, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "betas, message",
    [
        (torch.tensor([0.1, float("nan")], dtype=torch.float64), "NaN"),
        (torch.tensor([0.1, 1.0], dtype=torch.float64), "open interval"),
        (torch.tensor([0.0, 0.1], dtype=torch.float64), "open interval"),
        (torch.tensor([], dtype=torch.float64), "empty"),
        (torch.tensor([1, 2]), "floating-point"),
        (torch.full((2, 3), 0.1, dtype=torch.float64), "1-D"),
    ],
)
def test_bad_betas_are_refused_with_the_argument_named(betas, message):
    with pytest.raises((ValueError, TypeError), match="betas") as info:
        NoiseSchedule(betas)
    assert message in str(info.value)


def test_bad_num_steps():
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule.linear(0)
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule.cosine(2.5)


def test_at_picks_one_based_steps_and_casts():
    s = NoiseSchedule.linear(10)
    like = torch.zeros(3, 1, 4, 4)
    picked = s.at("betas", torch.tensor([1, 5, 10]), like)
    assert picked.shape == (3, 1, 1, 1) and picked.dtype == torch.float32
    assert picked.flatten().tolist() == pytest.approx(s.betas[[0, 4, 9]].tolist())


def test_buffers_follow_to():
    s = NoiseSchedule.linear(10).to(torch.device("meta"))
    assert s.betas.device.type == "meta"
    assert s.cast("betas", torch.float32).device.type == "meta"
