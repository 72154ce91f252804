"""Benchmark 3: cost of one training step as T grows.

For T in a list from 10 to 1000, on the 2-D MLP problem with a small batch (B = 16, so that
the per-step machinery is visible next to the network):

* ``chain/svi``: ``SVI(diffusion.model, diffusion.guide, pyro.optim.Adam, TraceMeanField_ELBO())``
  — the full reverse chain against the posterior-order forward chain, analytic KL at every
  site: T network calls and 2T Pyro sample sites per step.
* ``chain/plain``: the same computation written by hand (sample the posterior chain, the
  same T network calls, the same Gaussian KLs, ``torch.optim.Adam``).  The baseline.
* ``onestep/svi``: ``SVI`` with :class:`~pyro_diffusion.DiffusionELBO`: the step-restricted
  programs, one network call whatever T is.

The per-step cost of each variant is the least-squares slope of its median step time
against T; the difference of the two chain slopes is the per-step overhead of Pyro's
machinery (tracing, distribution objects, the ELBO's per-site bookkeeping), in µs.
"""

from __future__ import annotations

import copy
import math

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from pyro_diffusion import DiffusionELBO

from .common import Problem, Row, interleaved, make_problem, median, paired_ratio
from .svi_step import HandWrittenLoss

BATCH = 16


class HandWrittenChain(HandWrittenLoss):
    """−ELBO of the full chain with analytic KLs, by hand: the prior KL of q(x_T | x_0), then
    x_T ~ q(x_T | x_0) and for t = T..2 the KL of q(x_{t-1} | x_t, x_0) against
    p_θ(x_{t-1} | x_t) and a draw x_{t-1} ~ q(x_{t-1} | x_t, x_0); at t = 1 the Gaussian
    decoder's −log-likelihood."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem, "elbo")
        self.post_std = problem.diffusion.schedule.posterior_variance.sqrt().to(problem.device, torch.float32)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        B = x0.shape[0]
        T = self.T
        x_t = self.sqrt_ac[T - 1] * x0 + self.sqrt_1m_ac[T - 1] * torch.randn_like(x0)
        total = (0.5 * self.alpha_bar_T * x0**2).sum() + self.prior_const * x0.numel()
        for t in range(T, 0, -1):
            i = t - 1
            eps = self.net(x_t, self.gamma[i].expand(B))
            mean = (x_t - self.eps_coef[i] * eps) * self.inv_sqrt_alpha[i]
            log_var = self.log_var[i]
            if t == 1:
                nll = 0.5 * ((x0 - mean) ** 2 * torch.exp(-log_var) + log_var + math.log(2 * math.pi))
                return total + nll.sum()
            q_mean = self.coef_x0[i] * x0 + self.coef_xt[i] * x_t
            q_log_var = self.q_log_var[i]
            kl = 0.5 * (
                log_var - q_log_var + (q_log_var.exp() + (q_mean - mean) ** 2) * torch.exp(-log_var) - 1
            )
            total = total + kl.sum()
            x_t = q_mean + self.post_std[i] * torch.randn_like(x0)
        return total


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(device: torch.device, quick: bool, sizes: tuple[str, ...]) -> list[Row]:
    pyro.enable_validation(False)
    steps_list = (10, 100, 1000) if quick else (10, 30, 100, 300, 1000)
    medians: dict[str, list[float]] = {"chain/plain": [], "chain/svi": [], "onestep/svi": []}
    rows = []
    for T in steps_list:
        pyro.clear_param_store()
        problem = make_problem("mlp2d", device, num_steps=T, batch=BATCH)
        x0 = problem.x0

        plain_problem = Problem(problem.name, copy.deepcopy(problem.diffusion), x0)
        hand = HandWrittenChain(plain_problem)
        plain_optim = torch.optim.Adam(plain_problem.diffusion.parameters(), lr=1e-3)

        def plain(hand=hand, optim=plain_optim, x0=x0):
            optim.zero_grad()
            hand(x0).backward()
            optim.step()

        chain_diffusion = copy.deepcopy(problem.diffusion)
        chain_diffusion.name = "chain"
        chain_svi = SVI(
            chain_diffusion.model, chain_diffusion.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO()
        )
        onestep_diffusion = copy.deepcopy(problem.diffusion)
        onestep_diffusion.name = "onestep"
        onestep_svi = SVI(
            onestep_diffusion.model, onestep_diffusion.guide, pyro.optim.Adam({"lr": 1e-3}), DiffusionELBO()
        )
        variants = {
            "chain/plain": plain,
            "chain/svi": lambda svi=chain_svi, x0=x0: svi.step(x0),
            "onestep/svi": lambda svi=onestep_svi, x0=x0: svi.step(x0),
        }
        inner = max(1, 100 // T)
        times, peaks = interleaved(variants, device, reps=3 if quick else 5, inner=inner, warmup=1)
        for variant in variants:
            medians[variant].append(median(times[variant]))
            ratio = None if variant == "chain/plain" else paired_ratio(times, variant, "chain/plain")
            rows.append(
                Row(
                    "chain_cost",
                    "mlp2d",
                    f"T={T} {variant}",
                    median(times[variant]),
                    ratio,
                    peaks[variant],
                    f"B={BATCH}",
                )
            )
    slopes = {name: _slope(list(steps_list), values) * 1e3 for name, values in medians.items()}
    overhead = slopes["chain/svi"] - slopes["chain/plain"]
    rows.append(
        Row(
            "chain_cost",
            "mlp2d",
            "per-step cost (µs)",
            None,
            None,
            None,
            f"chain/plain {slopes['chain/plain']:.0f}, chain/svi {slopes['chain/svi']:.0f}, "
            f"onestep/svi {slopes['onestep/svi']:.1f}; Pyro overhead per step {overhead:.0f} µs",
        )
    )
    pyro.clear_param_store()
    return rows
