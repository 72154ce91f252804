"""Benchmark 1: one training step through Pyro against the same step written by hand.

Variants, each with its own copy of the same initial network, the same batch and Adam
(lr 1e-3) — per loss (the step-subsampled full ELBO, and L_simple):

* ``plain``: the loss computed by hand in PyTorch from float32 coefficient tables indexed
  by t, ``torch.optim.Adam`` over all parameters.  The baseline.
* ``svi``: ``pyro.infer.SVI(diffusion.model, diffusion.guide, pyro.optim.Adam, loss)``.
* ``module``: Pyro's ``ELBOModule`` — ``loss(diffusion.model_module(),
  diffusion.guide_module())`` is an ``nn.Module`` — with ``torch.optim.Adam``.
* ``svi+val``: as ``svi`` with Pyro's validation on (the data checks read tensor values).
* ``svi+fused``: as ``svi`` with :class:`pyro_diffusion.FusedAdam`, a ``PyroOptim`` holding one
  ``torch.optim.Adam`` for all parameters (same updates; what ``pyro.optim.Adam``'s
  per-parameter optimizers cost is the difference to ``svi``).

Everything else runs with ``pyro.enable_validation(False)``.
"""

from __future__ import annotations

import copy
import math

import pyro
import pyro.optim
import torch
from pyro.infer import SVI

from pyro_diffusion import FusedAdam, SimplifiedLoss, StepSubsampledELBO

from .common import Problem, Row, interleaved, make_problem, median, paired_ratio

LOSSES = ("elbo", "simple")


class HandWrittenLoss:
    """The step-subsampled −ELBO (uniform t, Gaussian or discretized decoder, ε-prediction,
    σ_t² = β_t) or L_simple, written the way a practitioner would in plain PyTorch."""

    def __init__(self, problem: Problem, loss: str) -> None:
        diffusion = problem.diffusion
        schedule = diffusion.schedule
        self.net = diffusion.denoiser
        self.loss = loss
        self.T = schedule.num_steps
        self.decoder = diffusion.decoder
        self.half_width = 1.0 / (diffusion.num_levels - 1) if diffusion.num_levels else None
        f32 = {name: getattr(schedule, name).float() for name in dict(schedule.named_buffers())}
        self.sqrt_ac = f32["sqrt_alphas_cumprod"]
        self.sqrt_1m_ac = f32["sqrt_one_minus_alphas_cumprod"]
        self.eps_coef = f32["betas"] / f32["sqrt_one_minus_alphas_cumprod"]
        self.inv_sqrt_alpha = 1 / f32["alphas"].sqrt()
        self.coef_x0 = f32["posterior_mean_coef_x0"]
        self.coef_xt = f32["posterior_mean_coef_xt"]
        self.q_log_var = f32["posterior_log_variance_clipped"]
        log_var = f32["log_betas"].clone()
        log_var[0] = self.q_log_var[0]
        self.log_var = log_var
        alpha_bar_T = float(schedule.alphas_cumprod[-1])
        self.prior_const = 0.5 * ((1 - alpha_bar_T) - math.log(1 - alpha_bar_T) - 1)
        self.alpha_bar_T = alpha_bar_T

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        B = x0.shape[0]
        view = (B,) + (1,) * (x0.dim() - 1)
        t = torch.randint(1, self.T + 1, (B,), device=x0.device)
        i = t - 1
        noise = torch.randn_like(x0)
        x_t = self.sqrt_ac[i].view(view) * x0 + self.sqrt_1m_ac[i].view(view) * noise
        eps = self.net(x_t, t)
        if self.loss == "simple":
            return ((noise - eps) ** 2).sum()
        mean = (x_t - self.eps_coef[i].view(view) * eps) * self.inv_sqrt_alpha[i].view(view)
        log_var = self.log_var[i].view(view)
        q_mean = self.coef_x0[i].view(view) * x0 + self.coef_xt[i].view(view) * x_t
        q_log_var = self.q_log_var[i].view(view)
        kl = 0.5 * (log_var - q_log_var + (q_log_var.exp() + (q_mean - mean) ** 2) * torch.exp(-log_var) - 1)
        if self.decoder == "gaussian":
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
        per_datum = torch.where(t == 1, -log_lik.reshape(B, -1).sum(1), kl.reshape(B, -1).sum(1))
        prior = 0.5 * self.alpha_bar_T * (x0**2).reshape(B, -1).sum(1) + self.prior_const * x0[0].numel()
        return (per_datum * self.T + prior).sum()


def _copy(problem: Problem, name: str) -> Problem:
    diffusion = copy.deepcopy(problem.diffusion)
    diffusion.name = name
    return Problem(problem.name, diffusion, problem.x0)


def _pyro_loss(loss: str):
    return StepSubsampledELBO() if loss == "elbo" else SimplifiedLoss()


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
    svi = SVI(svi_diffusion.model, svi_diffusion.guide, pyro.optim.Adam({"lr": lr}), _pyro_loss(loss))

    def svi_step():
        svi.step(x0)

    def svi_validated():
        pyro.enable_validation(True)
        try:
            svi.step(x0)
        finally:
            pyro.enable_validation(False)

    fused_diffusion = _copy(problem, "fused").diffusion
    fused_svi = SVI(fused_diffusion.model, fused_diffusion.guide, FusedAdam({"lr": lr}), _pyro_loss(loss))

    def svi_fused_adam():
        fused_svi.step(x0)

    module_diffusion = _copy(problem, "module").diffusion
    elbo_module = _pyro_loss(loss)(module_diffusion.model_module(), module_diffusion.guide_module())
    module_optim = torch.optim.Adam(elbo_module.parameters(), lr=lr)

    def module_step():
        module_optim.zero_grad()
        elbo_module(x0).backward()
        module_optim.step()

    return {
        "plain": plain,
        "svi": svi_step,
        "module": module_step,
        "svi+val": svi_validated,
        "svi+fused": svi_fused_adam,
    }


def run(device: torch.device, quick: bool, sizes: tuple[str, ...]) -> list[Row]:
    """Median step time of each variant and its ratio to ``plain``, per size and loss."""
    rows = []
    pyro.enable_validation(False)
    for size in sizes:
        problem = make_problem(size, device)
        inner = {"mlp2d": 20, "digits": 4, "unet32": 4}[size]
        reps = 5 if quick else 11
        for loss in LOSSES:
            pyro.clear_param_store()
            steps = step_functions(problem, loss)
            times, peaks = interleaved(steps, device, reps=reps, inner=inner)
            for variant in steps:
                ratio = None if variant == "plain" else paired_ratio(times, variant, "plain")
                goal = ""
                if variant in ("svi", "svi+fused", "module"):
                    limit = 1.05 if device.type == "cpu" else 1.10
                    goal = f"goal <= {limit}: {'met' if ratio <= limit else 'MISSED'}"
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
