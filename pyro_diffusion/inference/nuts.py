r"""NUTS over the whole reverse chain (``pyro.infer.MCMC``), for small problems.

Target: p_θ(x_{0:T} | y) ∝ p_θ(x_{0:T}) p(y | x_0), the model's exact conditional, by
Hamiltonian Monte Carlo on all T + 1 sites at once.  The chain is sampled in its
*non-centred* form: Pyro's :class:`~pyro.infer.reparam.LocScaleReparam` (``centered=0``)
rewrites each site ``x_{t-1} ~ N(μ_θ(x_t, t), σ_t²)`` as ``z_{t-1} ~ N(0, I)``,
``x_{t-1} = μ_θ(x_t, t) + σ_t z_{t-1}``, so the prior is a standard normal and the posterior
geometry is set by the likelihood alone.  The last step is the Gaussian decoder (or the
continuous relaxation of a discretized one).

Cost: every leapfrog step differentiates through the T network calls of the chain, and a
NUTS trajectory takes up to 2^max_tree_depth leapfrog steps, so this is for 2-D data and
T ≤ 100.  Two ways to run several chains:

* ``vectorize_chains=False`` (default): independent chains one after another (no worker
  processes), chain c seeded with ``seed + c``: the textbook set-up for R-hat.
* ``vectorize_chains=True``: the C chains are C copies of the problem inside a
  ``pyro.plate("chains", C)`` sampled by *one* NUTS run on the product space.  The target
  factorizes, so each copy's marginal is the posterior, and one batched network call serves
  all copies (on a CPU the cost per leapfrog step barely grows with C).  The copies share the
  step size, mass matrix and trajectory lengths, so they are not independent Markov chains;
  R-hat across them still exposes copies stuck in different modes, which is what it is used
  for here.

``jit_compile=True`` traces the potential energy once with :func:`torch.jit.trace` (Pyro's
``NUTS(jit_compile=True)``); the denoiser's parameters are frozen (``requires_grad=False``)
for the run, which the trace needs and which NUTS does not use.  The potential is the same
function (checked to the last digit on the 2-D mixture model); on one CPU thread the
gradient of the T = 20 chain costs about 2.6 times less and a NUTS iteration about half.

The sample statistics (divergences, log density, step size, tree size) are recorded per
draw for :func:`pyro_diffusion.inference.arviz.from_nuts`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import init_to_sample
from pyro.infer.reparam import LocScaleReparam

from ..diffusion import GaussianDiffusion
from .observations import LinearObservation, check_conditioning
from .prior import DiffusionPrior

__all__ = ["conditional_model", "nuts_conditional", "NUTSResult"]


class _CountingNUTS(NUTS):
    """NUTS that counts evaluations of its potential energy (a JIT-compiled potential runs
    the network outside Python, where a module hook would not see it)."""

    def __init__(self, *args, counter: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self._counter = counter

    def _initialize_model_properties(self, model_args, model_kwargs):
        super()._initialize_model_properties(model_args, model_kwargs)
        potential_fn, counter = self.potential_fn, self._counter

        def counted(params):
            counter[0] += 1
            return potential_fn(params)

        self.potential_fn = counted


@dataclass
class NUTSResult:
    """What :func:`nuts_conditional` returns.

    Attributes:
        x0: posterior draws of x_0, ``(num_chains, num_samples, *event_shape)``.
        noise: the non-centred chain ``{site: (num_chains, num_samples, *event_shape)}``
            (sites ``x/x_T_decentered … x/x_0_decentered``).
        sample_stats: per draw ``(num_chains, num_samples)``: ``diverging``, ``lp`` (the log
            joint density, up to a constant), ``step_size``, ``tree_size`` (leapfrog steps).
        seconds: wall-clock time of all chains (warm-up included).
        network_calls: denoiser evaluations (each with its gradient), warm-up included:
            T per evaluation of the potential energy (one per leapfrog step).
    """

    x0: torch.Tensor
    noise: dict[str, torch.Tensor]
    sample_stats: dict[str, torch.Tensor]
    seconds: float
    network_calls: int
    extra: dict = field(default_factory=dict)


def conditional_model(
    prior: DiffusionPrior, observation: LinearObservation, y: torch.Tensor, name: str = "x"
):
    """The Pyro model ``x_0 ~ prior``, ``y ~ N(A vec(x_0), σ_y² I)`` (observed); returns x_0."""
    x0 = prior(name)
    pyro.sample("y", observation.distribution(x0), obs=y)
    return x0


def nuts_conditional(
    diffusion: GaussianDiffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    *,
    num_samples: int = 500,
    warmup_steps: int = 500,
    num_chains: int = 4,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 8,
    seed: int = 0,
    full_mass: bool = False,
    vectorize_chains: bool = False,
    jit_compile: bool = False,
    progress: bool = False,
) -> NUTSResult:
    """Sample p_θ(x_0 | y) by NUTS on the non-centred chain (see the module docstring).

    Args:
        diffusion: the trained diffusion (a discretized decoder is relaxed to a Gaussian).
        observation: the observation model; y: one observation ``(m,)``.
        num_samples, warmup_steps: per chain.
        num_chains: chains run one after another, chain c seeded with ``seed + c``.
        target_accept_prob, max_tree_depth, full_mass: NUTS settings (``full_mass``: adapt
            a dense mass matrix, which removes the likelihood's stiff directions).
        vectorize_chains: run the chains as one NUTS run over a plate of copies (see the
            module docstring).
        jit_compile: JIT-compile the potential energy (see the module docstring).
        progress: show Pyro's progress bar.
    """
    check_conditioning(diffusion, observation, y)
    for arg, value in (("num_samples", num_samples), ("num_chains", num_chains)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected a non-negative int, got {warmup_steps!r}")
    prior = DiffusionPrior(diffusion, decoder="gaussian")
    names = prior.site_names("x")
    runs, copies = (1, num_chains) if vectorize_chains else (num_chains, 1)

    def base(prior, observation, y):
        if not vectorize_chains:
            return conditional_model(prior, observation, y)
        with pyro.plate("chains", copies, dim=-1):
            return conditional_model(prior, observation, y)

    model = poutine.reparam(base, config={site: LocScaleReparam(centered=0.0) for site in names})
    calls = [0]  # evaluations of the potential energy (each runs the T network calls)
    frozen = [(p, p.requires_grad) for p in diffusion.denoiser.parameters()]
    start = time.perf_counter()
    draws: list[dict[str, torch.Tensor]] = []
    stats: dict[str, list[torch.Tensor]] = {"diverging": [], "lp": [], "step_size": [], "tree_size": []}
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for chain in range(runs):
            pyro.set_rng_seed(seed + chain)
            kernel = _CountingNUTS(
                model,
                target_accept_prob=target_accept_prob,
                max_tree_depth=max_tree_depth,
                init_strategy=init_to_sample,
                full_mass=full_mass,
                jit_compile=jit_compile,
                ignore_jit_warnings=True,
                counter=calls,
            )
            record = {"lp": [], "step_size": [], "tree_size": []}
            last_calls = [calls[0]]

            def hook(kernel, params, stage, i, record=record, last_calls=last_calls):
                if stage == "Sample":
                    record["lp"].append(-float(kernel._potential_energy_last))
                    record["step_size"].append(float(kernel.step_size))
                    record["tree_size"].append(calls[0] - last_calls[0])
                last_calls[0] = calls[0]

            mcmc = MCMC(
                kernel,
                num_samples=num_samples,
                warmup_steps=warmup_steps,
                num_chains=1,
                hook_fn=hook,
                disable_progbar=not progress,
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*num_chains.*")
                mcmc.run(prior, observation, y)
            samples = {k: v.detach() for k, v in mcmc.get_samples().items()}
            if vectorize_chains:  # (draws, C, *event) → C chains
                draws.extend({k: v[:, c] for k, v in samples.items()} for c in range(copies))
            else:
                draws.append(samples)
            diverging = torch.zeros(num_samples, dtype=torch.bool)
            divergent = mcmc.diagnostics()["divergences"]["chain 0"]
            diverging[torch.as_tensor(divergent, dtype=torch.long)] = True
            # one potential evaluation (with its gradient) per leapfrog step
            per_draw = {
                "diverging": diverging,
                "lp": torch.tensor(record["lp"]),
                "step_size": torch.tensor(record["step_size"]),
                "tree_size": torch.tensor(record["tree_size"]),
            }
            for key, value in per_draw.items():
                stats[key].extend([value] * copies)
    finally:
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    seconds = time.perf_counter() - start
    noise = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    with torch.no_grad():
        z = {t: noise[f"{names[diffusion.num_steps - t]}_decentered"] for t in range(diffusion.num_steps + 1)}
        x0 = prior.chain_from_noise(z)
    return NUTSResult(
        x0=x0,
        noise=noise,
        sample_stats={k: torch.stack(v) for k, v in stats.items()},
        seconds=seconds,
        network_calls=calls[0] * diffusion.num_steps,
        extra={
            "num_warmup": warmup_steps,
            "max_tree_depth": max_tree_depth,
            "target_accept_prob": target_accept_prob,
            "jit_compile": jit_compile,
        },
    )
