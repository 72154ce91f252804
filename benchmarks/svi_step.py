"""Benchmark 1: one training step through Pyro against the same step written by hand.

Variants, each with its own copy of the same initial network, the same batch and Adam
(lr 1e-3) — per loss (``elbo``: :class:`~pyro_diffusion.DiffusionELBO`, the one-step
estimate of −ELBO; ``simple``: :class:`~pyro_diffusion.SimplifiedLoss`, L_simple):

* ``plain``: the same one-step estimator computed by hand in PyTorch from float32 DDPM
  coefficient tables indexed by t (draw t and ε, x_t, the network, the Gaussian KL in closed
  form or the decoder's −log-likelihood at t = 1, the prior KL), ``torch.optim.Adam`` over all
  parameters.  The baseline.
* ``svi``: ``pyro.infer.SVI(diffusion.model, diffusion.guide, pyro.optim.Adam, loss)``: the
  loss runs the step-restricted model and guide under ``poutine.trace``/``replay`` and reads
  the per-site KLs from the traces; ``pyro.optim.Adam`` keeps one ``torch.optim.Adam`` per
  parameter tensor.
* ``module``: Pyro's ``ELBOModule`` — ``loss(d.model_module(), d.guide_module())``, an
  ``nn.Module`` running the same programs and the same loss, with module-local parameters
  (nothing enters Pyro's param store) — and one ``torch.optim.Adam`` over its parameters.
* ``module+store``: the same through plain ``nn.Module`` wrappers of ``d.model`` and
  ``d.guide`` (``benchmarks.common.ModelModule``/``GuideModule``) without
  ``module_local_params``: every evaluation enters the parameters in the global param store
  (``diffusion.register()``), as under SVI.
* ``svi+val``: as ``svi`` with Pyro's validation on (the data checks read tensor values).

The image problems use the Gaussian decoder here (``make_problem(..., decoder="gaussian")``):
with the discretized decoder the one-step ELBO's masked decoder term, computed for every datum,
takes ``torch.special.log_ndtr`` of standardized values beyond ~4.6·10⁴ at high noise levels,
whose float32 backward is NaN, and the NaN passes through the mask into the parameters within
a few steps (the step costs the same; Pyro's validation then stops the ``svi+val`` variant).

Everything else runs with ``pyro.enable_validation(False)``.  Before timing, the hand-written
loss is checked against the Pyro loss at the same steps and the same x_t (the ``agree`` row:
the largest difference of the per-datum losses relative to their mean).
"""

from __future__ import annotations

import copy
import math

import pyro
import pyro.optim
import torch
from pyro.infer import SVI

from pyro_diffusion import DiffusionELBO, SimplifiedLoss, StepDraw

from .common import GuideModule, ModelModule, Problem, Row, interleaved, make_problem, median, paired_ratio

LOSSES = ("elbo", "simple")
#: the sizes the ≤ 1.05 goal is set on (the U-Nets); the MLP's ratio is reported without one
GOAL_SIZES = ("digits", "unet32")
#: the image problems' decoder in this benchmark (module docstring)
DECODER = "gaussian"


class HandWrittenLoss:
    """The one-step −ELBO estimate (uniform t ∈ {1..T}, weight T; Gaussian or discretized
    decoder at t = 1; ε-prediction, σ_t² = β_t, decoder variance β̃_2) or L_simple, written the
    way a practitioner would in plain PyTorch, from float32 tables of the DDPM quantities.

    ``__call__(x0, t=None, noise=None, per_datum=False)``: the summed loss (or per datum), with
    t and ε drawn unless given."""

    def __init__(self, problem: Problem, loss: str) -> None:
        diffusion = problem.diffusion
        schedule = diffusion.schedule
        device = problem.device
        self.net = diffusion.denoiser
        self.loss = loss
        self.T = schedule.num_steps
        self.gaussian = diffusion.num_levels is None
        self.half_width = None if self.gaussian else 1.0 / (diffusion.num_levels - 1)
        betas = schedule.betas
        abar = schedule.alphas_cumprod
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = schedule.posterior_variance
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped at t = 1

        def f32(values):
            return values.to(device=device, dtype=torch.float32)

        self.gamma = f32(schedule.gammas)  # the network's input: the noise level of step t
        self.sqrt_ac = f32(abar.sqrt())
        self.sqrt_1m_ac = f32((1 - abar).sqrt())
        self.eps_coef = f32(betas / (1 - abar).sqrt())
        self.inv_sqrt_alpha = f32(1 / (1 - betas).sqrt())
        self.coef_x0 = f32(betas * abar_prev.sqrt() / (1 - abar))
        self.coef_xt = f32((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar))
        self.q_log_var = f32(post_log_var)
        log_var = torch.log(betas).clone()
        log_var[0] = post_log_var[0]  # the decoder's variance β̃_2
        self.log_var = f32(log_var)
        alpha_bar_T = float(abar[-1])
        self.prior_const = 0.5 * ((1 - alpha_bar_T) - math.log(1 - alpha_bar_T) - 1)
        self.alpha_bar_T = alpha_bar_T

    def __call__(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        per_datum: bool = False,
    ) -> torch.Tensor:
        B = x0.shape[0]
        view = (B,) + (1,) * (x0.dim() - 1)
        if t is None:
            t = torch.randint(1, self.T + 1, (B,), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        i = t - 1
        x_t = self.sqrt_ac[i].view(view) * x0 + self.sqrt_1m_ac[i].view(view) * noise
        eps = self.net(x_t, self.gamma[i])
        if self.loss == "simple":
            out = ((noise - eps) ** 2).reshape(B, -1).sum(1)
            return out if per_datum else out.sum()
        mean = (x_t - self.eps_coef[i].view(view) * eps) * self.inv_sqrt_alpha[i].view(view)
        log_var = self.log_var[i].view(view)
        q_mean = self.coef_x0[i].view(view) * x0 + self.coef_xt[i].view(view) * x_t
        q_log_var = self.q_log_var[i].view(view)
        kl = 0.5 * (log_var - q_log_var + (q_log_var.exp() + (q_mean - mean) ** 2) * torch.exp(-log_var) - 1)
        if self.gaussian:
            log_lik = -0.5 * ((x0 - mean) ** 2 * torch.exp(-log_var) + log_var + math.log(2 * math.pi))
        else:  # the DDPM reference's discretized Gaussian
            h = self.half_width
            inv_std = torch.exp(-0.5 * log_var)
            upper = (x0 - mean + h) * inv_std
            lower = (x0 - mean - h) * inv_std
            log_cdf_upper = torch.special.log_ndtr(upper)
            log_sf_lower = torch.special.log_ndtr(-lower)
            delta = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
            log_lik = torch.where(
                x0 < -1 + h, log_cdf_upper, torch.where(x0 > 1 - h, log_sf_lower, delta.log())
            )
        step = torch.where(t == 1, -log_lik.reshape(B, -1).sum(1), kl.reshape(B, -1).sum(1))
        prior = 0.5 * self.alpha_bar_T * (x0**2).reshape(B, -1).sum(1) + self.prior_const * x0[0].numel()
        out = step * self.T + prior
        return out if per_datum else out.sum()


def _copy(problem: Problem, name: str) -> Problem:
    diffusion = copy.deepcopy(problem.diffusion)
    diffusion.name = name
    return Problem(problem.name, diffusion, problem.x0)


def pyro_loss(loss: str):
    return DiffusionELBO() if loss == "elbo" else SimplifiedLoss()


@torch.no_grad()
def agreement(problem: Problem, loss: str, seed: int = 0) -> float:
    """Largest difference between the per-datum hand-written loss and the Pyro loss at the same
    steps (random t, four data at t = 1) and the same x_t, relative to the mean loss."""
    diffusion, x0 = problem.diffusion, problem.x0
    hand = HandWrittenLoss(problem, loss)
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(1, hand.T + 1, (x0.shape[0],), generator=generator).to(x0.device)
    t[: min(4, len(t))] = 1  # the decoder's branch too
    pyro_side = pyro_loss(loss)
    with pyro.settings.context(module_local_params=True):  # leave the param store alone
        model_trace, guide_trace, draw = pyro_side.traces(
            diffusion.model, diffusion.guide, (x0,), {}, StepDraw(index=t)
        )
    expected = pyro_side.per_datum(model_trace, guide_trace, draw)
    x_t = guide_trace.nodes["x_t"]["value"]
    view = (-1,) + (1,) * (x0.dim() - 1)
    noise = (x_t - hand.sqrt_ac[t - 1].view(view) * x0) / hand.sqrt_1m_ac[t - 1].view(view)
    got = hand(x0, t, noise, per_datum=True)
    return ((got - expected).abs().max() / expected.abs().mean()).item()


def step_functions(problem: Problem, loss: str, lr: float = 1e-3) -> dict:
    """The training-step closures to compare, keyed by variant name."""
    x0 = problem.x0
    plain_problem = _copy(problem, "plain")
    hand = HandWrittenLoss(plain_problem, loss)
    plain_optim = torch.optim.Adam(plain_problem.diffusion.parameters(), lr=lr)

    def plain():
        plain_optim.zero_grad()
        hand(x0).backward()
        plain_optim.step()

    svi_diffusion = _copy(problem, "svi").diffusion
    svi = SVI(svi_diffusion.model, svi_diffusion.guide, pyro.optim.Adam({"lr": lr}), pyro_loss(loss))

    def svi_step():
        svi.step(x0)

    val_diffusion = _copy(problem, "val").diffusion
    val_svi = SVI(val_diffusion.model, val_diffusion.guide, pyro.optim.Adam({"lr": lr}), pyro_loss(loss))

    def svi_validated():
        pyro.enable_validation(True)
        try:
            val_svi.step(x0)
        finally:
            pyro.enable_validation(False)

    def module_step_fn(name: str, local: bool):
        diffusion = _copy(problem, name).diffusion
        if local:  # the core's nn.Module forms, which run the programs with module-local parameters
            model, guide = diffusion.model_module(), diffusion.guide_module()
        else:
            model, guide = ModelModule(diffusion), GuideModule(diffusion)
        elbo_module = pyro_loss(loss)(model, guide)
        optim = torch.optim.Adam(elbo_module.parameters(), lr=lr)

        def step():
            optim.zero_grad()
            elbo_module(x0).backward()
            optim.step()

        return step

    return {
        "plain": plain,
        "svi": svi_step,
        "module": module_step_fn("module", True),
        "module+store": module_step_fn("store", False),
        "svi+val": svi_validated,
    }


def run(device: torch.device, quick: bool, sizes: tuple[str, ...]) -> list[Row]:
    """Median step time of each variant and its ratio to ``plain``, per size and loss."""
    rows = []
    pyro.enable_validation(False)
    for size in sizes:
        problem = make_problem(size, device, decoder=DECODER)
        inner = {"mlp2d": 20, "digits": 4, "unet32": 4}[size]
        reps = 5 if quick else 11
        for loss in LOSSES:
            pyro.clear_param_store()
            rows.append(
                Row(
                    "svi_step",
                    size,
                    f"{loss}/agree",
                    note=f"hand-written vs Pyro loss: max |diff| / mean {agreement(problem, loss):.1e}",
                )
            )
            steps = step_functions(problem, loss)
            times, peaks = interleaved(steps, device, reps=reps, inner=inner)
            for variant in steps:
                ratio = None if variant == "plain" else paired_ratio(times, variant, "plain")
                goal = ""
                if size in GOAL_SIZES and variant in ("svi", "module"):
                    goal = f"goal <= 1.05: {'met' if ratio <= 1.05 else 'MISSED'}"
                rows.append(
                    Row(
                        "svi_step",
                        size,
                        f"{loss}/{variant}",
                        median(times[variant]),
                        ratio,
                        peaks[variant],
                        goal,
                    )
                )
        pyro.clear_param_store()
    return rows
