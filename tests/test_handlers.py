"""The losses run the Pyro programs: Pyro's own TraceMeanField_ELBO on the step-restricted
programs is DiffusionELBO, and handlers (scale, mask, condition) act on both alike.  The
package uses Pyro's public API only, within a pinned range of versions."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import kl_divergence

from pyro_diffusion import Diffusion, DiffusionELBO, LinearGamma, MLPDenoiser, NoiseSchedule, StepDraw
from pyro_diffusion.losses import trace_terms

ROOT = Path(__file__).resolve().parents[1]
T = 8


def make(decoder="network", variance="small", continuous=False):
    torch.manual_seed(0)
    schedule = LinearGamma(-6.0, 6.0) if continuous else NoiseSchedule.linear(T)
    net = MLPDenoiser(2, hidden=16, depth=1, learned_variance=variance == "learned")
    return Diffusion(net, schedule, (2,), decoder=decoder, variance=variance, num_steps=T).double()


def data(n=6):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def draw_maker(d, continuous):
    """Fresh draws with the same fixed steps (or times): every datum's step is known."""
    if continuous:
        u = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
        return lambda: StepDraw(times_values=u)
    first = 1 if d.decoder_uses_network else 2
    index = torch.tensor([first, 2, 3, 5, 8, 8])
    return lambda: StepDraw(index=index)


def both(model, guide, x0, make_draw, num_steps=None, seed=1):
    """(TraceMeanField_ELBO, DiffusionELBO) on the same programs, draw and seed."""
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # continuous time: the zero-width step has no density (NaN)
        pyro_value = TraceMeanField_ELBO().loss(model, guide, x0, steps=make_draw(), num_steps=num_steps)
    loss = DiffusionELBO(num_steps=num_steps)
    loss.make_draw = make_draw
    pyro.set_rng_seed(seed)
    return pyro_value, loss.loss(model, guide, x0)


def per_datum_terms(d, x0, make_draw, num_steps=None, seed=1, model=None, guide=None):
    loss = DiffusionELBO(num_steps=num_steps)
    loss.make_draw = make_draw
    pyro.set_rng_seed(seed)
    model_trace, guide_trace, _ = loss.traces(model or d.model, guide or d.guide, (x0,), {})
    return trace_terms(model_trace, guide_trace), model_trace, guide_trace


CASES = [
    (decoder, variance, continuous)
    for decoder in ("plain", "network", "ddpm")
    for variance in ("small", "large", "learned")
    for continuous in (False, True)
]


@pytest.mark.parametrize("decoder, variance, continuous", CASES)
def test_pyros_trace_mean_field_elbo_is_diffusion_elbo_on_the_step_programs(decoder, variance, continuous):
    d = make(decoder, variance, continuous)
    x0 = data()
    num_steps = 0 if continuous else None
    pyro_value, ours = both(d.model, d.guide, x0, draw_maker(d, continuous), num_steps)
    assert ours == pytest.approx(pyro_value, rel=1e-12, abs=1e-10)
    # and the value is the sum of the per-datum terms each loss keeps
    terms, _, _ = per_datum_terms(d, x0, draw_maker(d, continuous), num_steps)
    assert sum(v.sum() for v in terms.values()).item() == pytest.approx(ours, rel=1e-12)


@pytest.mark.parametrize("continuous", [False, True])
def test_scaling_the_programs_scales_both_elbos_alike(continuous):
    d = make("network", "large", continuous)
    x0 = data()
    num_steps = 0 if continuous else None
    make_draw = draw_maker(d, continuous)
    base, base_ours = both(d.model, d.guide, x0, make_draw, num_steps)
    model2, guide2 = poutine.scale(d.model, scale=2.0), poutine.scale(d.guide, scale=2.0)
    for model, guide in ((model2, guide2), (model2, d.guide), (d.model, guide2)):
        pyro_value, ours = both(model, guide, x0, make_draw, num_steps)
        assert ours == pytest.approx(pyro_value, rel=1e-12, abs=1e-10)
    pyro_value, ours = both(model2, guide2, x0, make_draw, num_steps)
    assert ours == pytest.approx(2 * base_ours, rel=1e-12)
    # scaling the model alone doubles the observed terms; the KLs follow the guide's scale
    terms, model_trace, _ = per_datum_terms(d, x0, make_draw, num_steps)
    observed = sum(
        terms[n].sum() for n, s in model_trace.nodes.items() if s["type"] == "sample" and s["is_observed"]
    )
    _, ours = both(model2, d.guide, x0, make_draw, num_steps)
    assert ours == pytest.approx(base_ours + observed.item(), rel=1e-12)
    _, ours = both(d.model, guide2, x0, make_draw, num_steps)
    assert ours == pytest.approx(2 * base_ours - observed.item(), rel=1e-12)


@pytest.mark.parametrize("continuous", [False, True])
def test_masking_data_removes_them_from_both_elbos(continuous):
    d = make("ddpm", "small", continuous)
    x0 = data()
    num_steps = 0 if continuous else None
    make_draw = draw_maker(d, continuous)
    keep = torch.tensor([True, False, True, True, False, True])
    terms, _, _ = per_datum_terms(d, x0, make_draw, num_steps)
    per_datum = sum(v for v in terms.values())
    model, guide = poutine.mask(d.model, mask=keep), poutine.mask(d.guide, mask=keep)
    pyro_value, ours = both(model, guide, x0, make_draw, num_steps)
    assert ours == pytest.approx(pyro_value, rel=1e-12, abs=1e-10)
    assert ours == pytest.approx(per_datum[keep].sum().item(), rel=1e-12)
    nothing = torch.zeros(6, dtype=torch.bool)
    _, ours = both(
        poutine.mask(d.model, mask=nothing), poutine.mask(d.guide, mask=nothing), x0, make_draw, num_steps
    )
    assert ours == 0.0


def test_conditioning_the_noisy_point_gives_the_bound_at_that_point():
    """poutine.condition of both programs on x_t = z: x_t is an observation, so both ELBOs give
    L_T + n·[ℓ_t(z) − log q(z | x_0)] (+ the decoder term, which does not use x_t)."""
    d = make("plain", "large")
    x0 = data()
    index = torch.tensor([2, 2, 3, 5, 8, 8])
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    model, guide = poutine.condition(d.model, data={"x_t": z}), poutine.condition(d.guide, data={"x_t": z})
    pyro_value, ours = both(model, guide, x0, lambda: StepDraw(index=index))
    assert ours == pytest.approx(pyro_value, rel=1e-12, abs=1e-10)
    grid = d.grid()
    gamma_s, gamma_t = grid[index - 2], grid[index - 1]
    step = kl_divergence(d.forward_step(x0, z, gamma_s, gamma_t), d.reverse_step(z, gamma_s, gamma_t)[0]).sum(
        1
    )
    log_q = d.marginal(x0, gamma_t).log_prob(z).sum(1)
    terms, _, _ = per_datum_terms(d, x0, lambda: StepDraw(index=index), model=model, guide=guide)
    torch.testing.assert_close(terms["x_s"], (T - 1) * step, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["x_t"], -(T - 1) * log_q, rtol=1e-12, atol=1e-12)
    expected = (T - 1) * (step - log_q) + terms["x_T"] + terms["x_0"]
    assert ours == pytest.approx(expected.sum().item(), rel=1e-12)


# ---------------------------------------------------------------------------- Pyro's API
PRIVATE_PYRO = [
    r"_PYRO_STACK",
    r"get_param_store\(\)\._params",
    r"_state_waiting_to_be_consumed",
    r"_initialize_model_properties",
    r"_update_weights",
    r"_maybe_importance_resample",
    r"from pyro[\w.]* import _",
    r"pyro\.optim\.optim\._",
    r"\._log_weights",
]


def test_the_package_uses_no_private_pyro_api():
    found = []
    for path in sorted((ROOT / "pyro_diffusion").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in PRIVATE_PYRO:
                if re.search(pattern, line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "private Pyro API:\n" + "\n".join(found)


def test_pyproject_pins_pyro_with_an_upper_bound():
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"pyro-ppl\s*([^"]*)"', text)
    assert match, "pyro-ppl is not a dependency"
    spec = match.group(1)
    assert re.search(r">=\s*\d", spec) and re.search(r"<\s*\d", spec), spec
    installed = tuple(int(p) for p in re.findall(r"\d+", pyro.__version__)[:2])
    upper = tuple(int(p) for p in re.findall(r"\d+", re.search(r"<\s*([\d.]+)", spec).group(1))[:2])
    assert installed < upper, (pyro.__version__, spec)
