r"""NUTS over the whole reverse chain (``pyro.infer.MCMC``), for small problems.

Target: p_θ(x_{0:K} | y) ∝ p_θ(x_{0:K}) p(y | x_0), the model's exact conditional on a grid
of K noise levels (the model's own, or a sub-grid: ``num_steps``), by Hamiltonian Monte Carlo
on all K + 1 sites at once.  The chain (a :class:`~pyro_diffusion.inference.prior.DiffusionPrior`)
is sampled in its *non-centred* form: Pyro's :class:`~pyro.infer.reparam.LocScaleReparam`
(``centered=0``) rewrites each site ``x_{k-1} ~ N(μ_θ(x_k), s_k²)`` as ``z_{k-1} ~ N(0, I)``,
``x_{k-1} = μ_θ(x_k) + s_k z_{k-1}``, so the prior is a standard normal and the posterior
geometry is set by the likelihood alone.  The last step is the decoder (or the continuous
relaxation of a discretized one).

The potential energy is built with Pyro's public
:func:`pyro.infer.mcmc.util.initialize_model` and handed to :class:`pyro.infer.NUTS` as
``potential_fn``, wrapped so that its evaluations are counted (a JIT-compiled potential runs
the network outside Python, where a module hook would not see it) and the log density of
each draw is read off the evaluation that produced it.

Cost: every leapfrog step differentiates through the K network calls of the chain, and a
NUTS trajectory takes up to 2^max_tree_depth leapfrog steps, so this is for 2-D data and
K ≤ 100 (a sub-grid of a longer chain: ``num_steps``).  Two ways to run several chains:

* ``vectorize_chains=False`` (default): independent chains one after another (no worker
  processes), chain c seeded with ``seed + c``: the textbook set-up for R-hat.
* ``vectorize_chains=True``: the C chains are C copies of the problem inside a
  ``pyro.plate("chains", C)`` sampled by *one* NUTS run on the product space.  The target
  factorizes, so each copy's marginal is the posterior, and one batched network call serves
  all copies (on a CPU the cost per leapfrog step barely grows with C).  The copies share the
  step size, mass matrix and trajectory lengths, so they are not independent Markov chains;
  R-hat across them still exposes copies stuck in different modes, which is what it is used
  for here.

``jit_compile=True`` traces the potential energy once with :func:`torch.jit.trace`
(``initialize_model(jit_compile=True)``, what ``NUTS(model, jit_compile=True)`` does); the
diffusion's parameters (denoiser, and a learned schedule's) are frozen
(``requires_grad=False``) for the run, which the trace needs and which NUTS does not use.  The potential is the same
function (checked to the last digit on the 2-D mixture model); on one CPU thread the
gradient of the K = 20 chain costs about 2.6 times less and a NUTS iteration about half.

The sample statistics (divergences, log density, step size, tree size) are recorded per
draw for :func:`pyro_diffusion.inference.arviz.from_nuts`.
"""

from __future__ import annotations

import time
import warnings

import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import init_to_sample
from pyro.infer.mcmc.util import initialize_model
from pyro.infer.reparam import LocScaleReparam

from ..diffusion import Diffusion
from .observations import LinearObservation, check_conditioning
from .prior import DiffusionPrior, frozen
from .result import PosteriorResult

__all__ = ["conditional_model", "nuts_conditional", "CountedPotential", "MAX_LEVELS"]

#: the longest chain :func:`nuts_conditional` accepts by default (its ``max_levels``)
MAX_LEVELS = 200


class CountedPotential:
    """A potential energy ``params -> U`` that counts its evaluations and remembers the
    energies it computed since the last draw, so that the log density of a draw (one of the
    points NUTS evaluated) is read off without evaluating the chain again."""

    def __init__(self, potential_fn) -> None:
        self.potential_fn = potential_fn
        self.calls = 0
        self.extra_calls = 0
        self._recent: list[tuple[dict, torch.Tensor]] = []

    def __call__(self, params: dict) -> torch.Tensor:
        energy = self.potential_fn(params)
        self.calls += 1
        self._recent.append(({k: v.detach() for k, v in params.items()}, energy.detach()))
        return energy

    def energy_at(self, params: dict) -> float:
        """U at ``params`` (a point evaluated since the last call, else evaluated afresh);
        forgets the other remembered points."""
        for values, energy in reversed(self._recent):
            if values.keys() == params.keys() and all(torch.equal(values[k], params[k]) for k in params):
                self._recent = [(values, energy)]
                return float(energy)
        with torch.no_grad():
            energy = self.potential_fn({k: v.detach() for k, v in params.items()})
        self.extra_calls += 1
        self._recent = [({k: v.detach() for k, v in params.items()}, energy.detach())]
        return float(energy)


def conditional_model(
    prior: DiffusionPrior, observation: LinearObservation, y: torch.Tensor, name: str = "x"
):
    """The Pyro model ``x_0 ~ prior``, ``y ~ N(A vec(x_0), σ_y² I)`` (observed); returns x_0."""
    x0 = prior(name)
    pyro.sample("y", observation.distribution(x0), obs=y)
    return x0


def _check_int(name: str, value, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}{hint}, got {value!r}")


def nuts_conditional(
    diffusion: Diffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    *,
    num_samples: int = 100,
    warmup_steps: int = 100,
    num_chains: int = 2,
    num_steps: int | None = None,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 6,
    seed: int = 0,
    full_mass: bool = False,
    vectorize_chains: bool = False,
    jit_compile: bool = False,
    progress: bool = False,
    max_levels: int | None = MAX_LEVELS,
) -> PosteriorResult:
    """Sample p_θ(x_0 | y) by NUTS on the non-centred chain (see the module docstring).

    The defaults (2 chains × 100 draws after 100 warm-up, trees of at most 2⁶ leapfrog steps)
    are a first try that finishes in about a minute on a 2-D problem at K = 20; a run for
    R-hat < 1.01 wants 4 chains and several hundred draws each.

    Args:
        diffusion: the trained diffusion (a discretized decoder is relaxed to a Gaussian).
        observation: the observation model; y: one observation ``(m,)``.
        num_samples: draws per chain, at least 4 (Pyro's MCMC diagnostics need four).
        warmup_steps: warm-up iterations per chain.
        num_chains: chains run one after another, chain c seeded with ``seed + c``.
        num_steps: the grid: None (default) the model's own, K a K-level grid
            (``diffusion.grid(K)``, respaced for a tabulated schedule).
        target_accept_prob, max_tree_depth, full_mass: NUTS settings (``full_mass``: adapt
            a dense mass matrix, which removes the likelihood's stiff directions).
        vectorize_chains: run the chains as one NUTS run over a plate of copies (see the
            module docstring).
        jit_compile: JIT-compile the potential energy (see the module docstring).
        progress: show Pyro's progress bar.
        max_levels: refuse a chain of more levels than this (None: no limit): every leapfrog
            step differentiates through all K levels, so a model's own grid of 1000 levels
            would take hours; pass ``num_steps=K`` (K ≤ 100) instead.

    Returns:
        a :class:`~pyro_diffusion.inference.result.PosteriorResult` with ``draws``
        ``(num_chains · num_samples, *event_shape)`` chain-major (``num_chains`` set;
        :meth:`~PosteriorResult.chains` reshapes) and ``diagnostics``: ``sample_stats``
        ``{diverging, lp, step_size, tree_size}`` each ``(num_chains, num_samples)``
        (``lp`` the log joint density up to a constant, ``tree_size`` the potential
        evaluations of the draw), ``noise`` ``{site: (num_chains, num_samples, *event_shape)}``
        (sites ``x/x_K_decentered … x/x_0_decentered``) and the NUTS settings.
        ``network_calls`` counts denoiser evaluations, warm-up included (each with its
        gradient): the chain's K − 1 steps, and the decoder when it uses the network, per
        evaluation of the potential.
    """
    check_conditioning(diffusion, observation, y)
    _check_int("num_samples", num_samples, 4, " (Pyro's MCMC diagnostics need four draws per chain)")
    _check_int("num_chains", num_chains, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("max_tree_depth", max_tree_depth, 1)
    if not isinstance(target_accept_prob, (int, float)) or not 0 < target_accept_prob < 1:
        raise ValueError(f"target_accept_prob: expected a number in (0, 1), got {target_accept_prob!r}")
    prior = DiffusionPrior(diffusion, num_steps=num_steps, decoder="gaussian")
    names = prior.site_names("x")
    K = prior.num_steps
    if max_levels is not None and K > max_levels:
        raise ValueError(
            f"num_steps: the chain has {K} levels (more than max_levels={max_levels}); NUTS "
            f"differentiates through every level at each leapfrog step: pass num_steps=K with K <= 100"
        )
    runs, copies = (1, num_chains) if vectorize_chains else (num_chains, 1)

    def base(prior, observation, y):
        if not vectorize_chains:
            return conditional_model(prior, observation, y)
        with pyro.plate("chains", copies, dim=-1):
            return conditional_model(prior, observation, y)

    model = poutine.reparam(base, config={site: LocScaleReparam(centered=0.0) for site in names})
    evaluations = 0
    extra = 0
    start = time.perf_counter()
    draws: list[dict[str, torch.Tensor]] = []
    stats: dict[str, list[torch.Tensor]] = {"diverging": [], "lp": [], "step_size": [], "tree_size": []}
    # the diffusion's parameters are constants of the target: frozen for the run (which the
    # JIT trace needs and NUTS does not use)
    with frozen(diffusion):
        for chain in range(runs):
            pyro.set_rng_seed(seed + chain)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                init_params, potential_fn, transforms, _ = initialize_model(
                    model,
                    model_args=(prior, observation, y),
                    max_plate_nesting=1 if vectorize_chains else 0,
                    jit_compile=jit_compile,
                    skip_jit_warnings=True,
                    init_strategy=init_to_sample,
                )
            potential = CountedPotential(potential_fn)
            kernel = NUTS(
                potential_fn=potential,
                transforms=transforms,
                target_accept_prob=target_accept_prob,
                max_tree_depth=max_tree_depth,
                full_mass=full_mass,
            )
            record = {"lp": [], "step_size": [], "tree_size": []}
            last_calls = [0]

            def hook(kernel, params, stage, i, record=record, last_calls=last_calls, potential=potential):
                if stage == "Sample":
                    record["lp"].append(-potential.energy_at(params))
                    record["step_size"].append(float(kernel.step_size))
                    record["tree_size"].append(potential.calls - last_calls[0])
                last_calls[0] = potential.calls

            mcmc = MCMC(
                kernel,
                num_samples=num_samples,
                warmup_steps=warmup_steps,
                num_chains=1,
                initial_params=init_params,
                hook_fn=hook,
                disable_progbar=not progress,
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*num_chains.*")
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                mcmc.run()
            evaluations += potential.calls
            extra += potential.extra_calls
            samples = {k: v.detach() for k, v in mcmc.get_samples().items()}
            if vectorize_chains:  # (draws, C, *event) → C chains
                draws.extend({k: v[:, c] for k, v in samples.items()} for c in range(copies))
            else:
                draws.append(samples)
            diverging = torch.zeros(num_samples, dtype=torch.bool)
            divergent = mcmc.diagnostics()["divergences"]["chain 0"]
            diverging[torch.as_tensor(divergent, dtype=torch.long)] = True
            per_draw = {
                "diverging": diverging,
                "lp": torch.tensor(record["lp"]),
                "step_size": torch.tensor(record["step_size"]),
                "tree_size": torch.tensor(record["tree_size"]),
            }
            for key, value in per_draw.items():
                stats[key].extend([value] * copies)
    seconds = time.perf_counter() - start
    noise = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    with torch.no_grad():
        z = {k: noise[f"{names[K - k]}_decentered"] for k in range(K + 1)}
        x0 = prior.chain_from_noise(z)  # (C, N, *event)
    return PosteriorResult(
        draws=x0.reshape(-1, *diffusion.event_shape),
        diagnostics={
            "sample_stats": {k: torch.stack(v) for k, v in stats.items()},
            "noise": noise,
            "num_warmup": warmup_steps,
            "max_tree_depth": max_tree_depth,
            "target_accept_prob": target_accept_prob,
            "full_mass": full_mass,
            "jit_compile": jit_compile,
            "vectorized": vectorize_chains,
            "potential_evaluations": evaluations,
        },
        seconds=seconds,
        network_calls=(evaluations + extra) * prior.network_calls_per_chain,
        method="nuts",
        num_steps=K,
        num_chains=num_chains,
    )
