r"""NUTS over the whole reverse chain (``pyro.infer.MCMC``), for small problems.

Target: p_θ(x_{0:K} | y) ∝ p_θ(x_{0:K}) p(y | x_0), the model's exact conditional on a grid
of K noise levels (the model's own, or a sub-grid: ``num_steps``), by Hamiltonian Monte Carlo
on all K + 1 levels at once.  The chain (a :class:`~pyro_diffusion.inference.prior.DiffusionPrior`)
is sampled in its *non-centred* form: each step ``x_{k-1} ~ N(μ_θ(x_k), s_k²)`` is written
``x_{k-1} = μ_θ(x_k) + s_k z_{k-1}`` with ``z_{k-1} ~ N(0, I)`` (x_K = z_K), so the prior is a
standard normal and the posterior geometry is set by the likelihood alone.  The last step is
the decoder (or the continuous relaxation of a discretized one).

Two Pyro programs define the same target (``potential=``):

* ``"vectorized"`` (default): :func:`noise_model`, one site ``x/noise`` of shape
  ``(K + 1, *event_shape)`` holding z_K … z_0, x_0 a ``pyro.deterministic`` site, y observed.
  Its potential is one pass down the chain with one batched network call per level for all
  copies of the chain, and no per-level Pyro sites to trace.
* ``"per-site"``: :func:`conditional_model` under Pyro's
  :class:`~pyro.infer.reparam.LocScaleReparam` (``centered=0``), the K + 1 sites
  ``x/x_K_decentered … x/x_0_decentered`` (what a user's own model with a
  :class:`DiffusionPrior` inside it looks like); the same potential up to float rounding
  (``tests/test_posterior_mcmc.py``), slower per evaluation.

Either potential comes from Pyro's public :func:`pyro.infer.mcmc.util.initialize_model` and
goes to :class:`pyro.infer.NUTS` as ``potential_fn``, wrapped so that its evaluations are
counted and the log density of each draw is read off the evaluation that produced it.

What makes it usable beyond 2-D data (dimension 8–64, K ≤ 100):

* ``init``: start the chains from draws of a cheap sampler (a :class:`PosteriorResult` such
  as twisted SMC's, or x_0 draws): :func:`noise_from_draws` walks the diffusion's forward
  chain q(x_{1:K} | x_0) from each draw and reads off the noises z_k, x_0 being redrawn from
  the decoder.  From the prior the chains spend their warm-up far out in the likelihood's
  tails, where the potential is stiff, and the adapted step size stays tiny.  NUTS does not
  move between well-separated modes, so the chains' modes are the initializer's.
* ``precondition=True``: a fixed linear change of variables z = L w per copy of the chain,
  ``L = (I + H)^{-1/2}`` with ``H = Jᵀ Aᵀ A J / σ_y²`` the likelihood's Gauss–Newton
  curvature at the starting point (J = ∂x_0/∂z, one backward pass per observed coordinate).
  H has rank ≤ m, so L is the identity plus a rank-m term; in w the posterior is close to
  N(0, I) where the chain map is close to linear, which the step size and tree depth see.
  (A dense mass matrix adapted in warm-up would do the same for one copy but needs more
  warm-up draws than the (K + 1)·D dimensions.)
* ``vectorize_chains=True``: the C chains are C copies of the problem inside a
  ``pyro.plate("chains", C)`` sampled by *one* NUTS run on the product space.  The target
  factorizes, so each copy's marginal is the posterior, and one batched network call serves
  all copies.  The copies share the step size, mass matrix and trajectory lengths, so they are
  not independent Markov chains; R-hat across them still exposes copies stuck in different
  modes.  With ``vectorize_chains=False`` (default) the chains run one after another, chain c
  seeded with ``seed + c``: the textbook set-up for R-hat.

``jit_compile=True`` traces the potential once with :func:`torch.jit.trace`
(``initialize_model(jit_compile=True)``); the diffusion's parameters are frozen
(``requires_grad=False``) for the run, which the trace needs and which NUTS does not use.

Cost: every leapfrog step differentiates through the K network calls of the chain, and a
NUTS trajectory takes up to 2^max_tree_depth leapfrog steps; ``max_levels`` refuses a model's
own grid of 1000 levels.  Where the network switches sharply between modes of the data (the
exact denoiser of a mixture of narrow components), the potential has walls between the
modes' basins and many trajectories diverge (``sample_stats["diverging"]``): watch that
fraction before trusting the draws.  The sample statistics (divergences, log density, step size, tree
size) are recorded per draw for :func:`pyro_diffusion.inference.arviz.from_nuts`.
"""

from __future__ import annotations

import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import init_to_sample
from pyro.infer.mcmc.util import initialize_model
from pyro.infer.reparam import LocScaleReparam

from ..diffusion import Diffusion
from .observations import LinearObservation, check_conditioning
from .prior import DiffusionPrior, frozen, inference_grid
from .result import PosteriorResult

__all__ = [
    "conditional_model",
    "noise_model",
    "noise_site",
    "chain_x0",
    "noise_from_draws",
    "LowRankPreconditioner",
    "nuts_conditional",
    "CountedPotential",
    "MAX_LEVELS",
    "POTENTIALS",
]

#: the longest chain :func:`nuts_conditional` accepts by default (its ``max_levels``)
MAX_LEVELS = 200

#: the two Pyro programs of the target (module docstring)
POTENTIALS = ("vectorized", "per-site")


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


def noise_site(name: str = "x") -> str:
    """The name of :func:`noise_model`'s one latent site, ``{name}/noise``."""
    return f"{name}/noise"


def chain_x0(prior: DiffusionPrior, noise: torch.Tensor) -> torch.Tensor:
    """x_0 of the non-centred chain from its stacked noises ``(*batch, K + 1, *event_shape)``
    (rows z_K … z_0, the order of :meth:`DiffusionPrior.site_names`): one batched network
    call per level for the whole batch.  Returns ``(*batch, *event_shape)``."""
    event_dims = prior.diffusion.event_dims
    K = prior.num_steps
    expected = (K + 1, *prior.event_shape)
    if noise.dim() < event_dims + 1 or tuple(noise.shape[noise.dim() - event_dims - 1 :]) != expected:
        raise ValueError(f"noise: expected trailing shape {expected}, got {tuple(noise.shape)}")
    dim = noise.dim() - event_dims - 1
    grid = inference_grid(prior.diffusion, prior.grid_size)
    x_t = noise.select(dim, 0)
    with frozen(prior.diffusion):
        for i, k in enumerate(range(K, 0, -1), start=1):  # (written out: K stays an int under a JIT trace)
            step = prior.step_distribution(x_t, k, grid).base_dist
            x_t = step.loc + step.scale * noise.select(dim, i)
    return x_t


def noise_model(prior: DiffusionPrior, observation: LinearObservation, y: torch.Tensor, name: str = "x"):
    """The non-centred conditional as a Pyro model with one vectorized latent site:
    ``{name}/noise ~ N(0, I)`` of shape ``(K + 1, *event_shape)`` (z_K … z_0), x_0 the
    deterministic site ``{name}/x_0`` (:func:`chain_x0`), ``y`` observed.  Plates of the
    caller broadcast it (its batch shape is ``()``).  Returns x_0."""
    shape = (prior.num_steps + 1, *prior.event_shape)
    zeros = torch.zeros(shape, dtype=y.dtype, device=prior.diffusion.device)
    noise = pyro.sample(noise_site(name), dist.Normal(zeros, 1.0).to_event(len(shape)))
    x0 = pyro.deterministic(f"{name}/x_0", chain_x0(prior, noise), event_dim=prior.diffusion.event_dims)
    pyro.sample("y", observation.distribution(x0), obs=y)
    return x0


@torch.no_grad()
def noise_from_draws(
    prior: DiffusionPrior, x0: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Chain noises ``(n, K + 1, *event_shape)`` for x_0 draws ``(n, *event_shape)``: the
    diffusion's forward chain x_K ~ q(x_K | x_0), x_{k-1} ~ q(x_{k-1} | x_k, x_0) from each
    draw, then z_K = x_K, z_{k-1} = (x_{k-1} − μ_θ(x_k)) / s_k, and a fresh z_0 ~ N(0, I)
    (the decoder's scale is far below the forward chain's last step, so the noise that
    would reproduce x_0 exactly is large).  A starting point for :func:`nuts_conditional`."""
    d = prior.diffusion
    if not isinstance(x0, torch.Tensor) or tuple(x0.shape[1:]) != tuple(d.event_shape) or x0.dim() < 2:
        raise ValueError(
            f"init: expected x_0 draws of shape (n, {', '.join(map(str, d.event_shape))}), "
            f"got {tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}"
        )
    x0 = x0.to(device=d.device, dtype=torch.get_default_dtype())
    grid = inference_grid(d, prior.grid_size)
    K = grid.shape[0]

    def normal(shape):
        return torch.randn(shape, generator=generator, dtype=x0.dtype).to(d.device)

    with frozen(d):
        m = d.marginal(x0, grid[K - 1])
        x_t = m.loc + m.scale * normal(x0.shape)
        noises = [x_t]
        for k in range(K, 1, -1):
            q = d.forward_step(x0, x_t, grid[k - 2], grid[k - 1])
            x_s = q.loc + q.scale * normal(x0.shape)
            step = prior.step_distribution(x_t, k, grid).base_dist
            noises.append((x_s - step.loc) / step.scale)
            x_t = x_s
        noises.append(normal(x0.shape))
    return torch.stack(noises, 1)


class LowRankPreconditioner:
    r"""The linear change of variables ``z = L w`` per copy of the chain with
    ``L = (I + H)^{-1/2}``, ``H = Gᵀ G``, ``G = A J / σ_y`` (J = ∂x_0/∂z at the starting
    point): ``L = I + V (diag((1 + s²)^{-1/2}) − I) Vᵀ`` from the thin SVD ``G = U S Vᵀ``
    (rank ≤ m).  ``noise`` ``(C, K + 1, *event_shape)``: the C starting points."""

    def __init__(self, prior: DiffusionPrior, observation: LinearObservation, noise: torch.Tensor) -> None:
        self.shape = tuple(noise.shape)
        C = noise.shape[0]
        z = noise.detach().clone().requires_grad_(True)
        with frozen(prior.diffusion):
            Ax = observation.mean(chain_x0(prior, z))  # (C, m)
            m = Ax.shape[-1]
            rows = []
            for j in range(m):
                (g,) = torch.autograd.grad(Ax[:, j].sum(), z, retain_graph=j < m - 1)
                rows.append(g.reshape(C, -1))
        scale = torch.as_tensor(observation.noise_scale, dtype=noise.dtype)
        G = torch.stack(rows, 1).to(torch.float64) / scale.to(torch.float64)  # (C, m, n)
        _, s, Vh = torch.linalg.svd(G, full_matrices=False)
        self.basis = Vh.to(noise.dtype)  # (C, r, n)
        self.factor = ((1 + s * s).rsqrt() - 1).to(noise.dtype)  # (C, r)
        #: sqrt(1 + s²): how much narrower than the prior the posterior is along each direction
        self.stiffness = (1 + s * s).sqrt()

    def _apply(self, v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        lead = v.shape[: v.dim() - len(self.shape)]
        flat = v.reshape(*lead, self.shape[0], -1)
        coef = torch.einsum("crn,...cn->...cr", self.basis, flat)
        return (flat + torch.einsum("crn,...cr->...cn", self.basis, coef * factor)).reshape(v.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """z = L w, for w ``(..., C, K + 1, *event_shape)``."""
        return self._apply(w, self.factor)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """w = L⁻¹ z."""
        return self._apply(z, 1 / (1 + self.factor) - 1)


def _check_int(name: str, value, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}{hint}, got {value!r}")


def _initial_noise(prior, init, count, generator):
    """``count`` starting noises from ``init`` (a PosteriorResult or x_0 draws)."""
    if isinstance(init, PosteriorResult):
        draws = init.sample(count, generator)
    elif isinstance(init, torch.Tensor):
        draws = init
        if draws.dim() >= 1 and draws.shape[0] < count:
            raise ValueError(
                f"init: expected at least {count} x_0 draws (one per chain), got {draws.shape[0]}"
            )
        draws = draws[:count]
    else:
        raise TypeError(
            f"init: expected None, a PosteriorResult or x_0 draws (n, *event_shape), got {type(init).__name__}"
        )
    return noise_from_draws(prior, draws, generator)


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
    potential: str = "vectorized",
    init=None,
    precondition: bool = False,
    reverse_variance=None,
) -> PosteriorResult:
    """Sample p_θ(x_0 | y) by NUTS on the non-centred chain (see the module docstring).

    The defaults (2 chains × 100 draws after 100 warm-up, trees of at most 2⁶ leapfrog steps,
    chains started from the prior) are a first try on 2-D data; at dimension 8–64 start
    from a cheap sampler (``init=twisted_smc(...)``) with ``precondition=True`` and many
    vectorized chains (``docs/prior.md`` §9 measures it).  A run for R-hat < 1.01 wants 4
    chains and several hundred draws each.

    Args:
        diffusion: the trained diffusion (a discretized decoder is relaxed to a Gaussian).
        observation: the observation model; y: one observation ``(m,)``.
        num_samples: draws per chain, at least 4 (Pyro's MCMC diagnostics need four).
        warmup_steps: warm-up iterations per chain.
        num_chains: chains run one after another, chain c seeded with ``seed + c``.
        num_steps: the grid: None (default) the model's own, K a K-level grid
            (``diffusion.grid(K)``, respaced for a tabulated schedule).
        target_accept_prob, max_tree_depth, full_mass: NUTS settings (``full_mass``: adapt
            a dense mass matrix; only for small (K + 1)·D with long warm-up).
        vectorize_chains: run the chains as one NUTS run over a plate of copies (see the
            module docstring).
        jit_compile: JIT-compile the potential energy (see the module docstring).
        progress: show Pyro's progress bar.
        max_levels: refuse a chain of more levels than this (None: no limit): every leapfrog
            step differentiates through all K levels, so a model's own grid of 1000 levels
            would take hours; pass ``num_steps=K`` (K ≤ 100) instead.
        potential: ``"vectorized"`` (:func:`noise_model`, default) or ``"per-site"``
            (:func:`conditional_model` non-centred site by site): the same target.
        init: None (each chain starts at a prior draw of its noises), or where to start the
            chains: a :class:`PosteriorResult` (``num_chains`` of its equally weighted draws)
            or x_0 draws ``(≥ num_chains, *event_shape)``; their chains come from
            :func:`noise_from_draws` (seeded by ``seed``).
        precondition: sample w with z = L w, :class:`LowRankPreconditioner` at each chain's
            starting point (``potential="vectorized"`` only).
        reverse_variance: None (the model's reverse variances) or per-level variances from
            :func:`~pyro_diffusion.inference.variances.analytic_variances` on the K-level grid:
            the chain whose conditional is sampled (as in :class:`DiffusionPrior`).

    Returns:
        a :class:`~pyro_diffusion.inference.result.PosteriorResult` with ``draws``
        ``(num_chains · num_samples, *event_shape)`` chain-major (``num_chains`` set;
        :meth:`~PosteriorResult.chains` reshapes) and ``diagnostics``: ``sample_stats``
        ``{diverging, lp, step_size, tree_size}`` each ``(num_chains, num_samples)``
        (``lp`` the log joint density up to a constant, ``tree_size`` the potential
        evaluations of the draw), ``noise`` ``{site: (num_chains, num_samples, *event_shape)}``
        (sites ``x/x_K_decentered … x/x_0_decentered``, z_K … z_0) and the NUTS settings.
        ``network_calls`` counts denoiser evaluations, warm-up included (each with its
        gradient, batched over vectorized chains): the chain's K − 1 steps, and the decoder
        when it uses the network, per evaluation of the potential (and per observed
        coordinate for the preconditioner's Jacobian).
    """
    check_conditioning(diffusion, observation, y)
    _check_int("num_samples", num_samples, 4, " (Pyro's MCMC diagnostics need four draws per chain)")
    _check_int("num_chains", num_chains, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("max_tree_depth", max_tree_depth, 1)
    if not isinstance(target_accept_prob, (int, float)) or not 0 < target_accept_prob < 1:
        raise ValueError(f"target_accept_prob: expected a number in (0, 1), got {target_accept_prob!r}")
    if potential not in POTENTIALS:
        raise ValueError(f"potential: expected one of {POTENTIALS}, got {potential!r}")
    if precondition and potential != "vectorized":
        raise ValueError("precondition: needs potential='vectorized' (one noise site to transform)")
    prior = DiffusionPrior(
        diffusion, num_steps=num_steps, decoder="gaussian", reverse_variance=reverse_variance
    )
    names = prior.site_names("x")
    site = noise_site("x")
    K = prior.num_steps
    if max_levels is not None and K > max_levels:
        raise ValueError(
            f"num_steps: the chain has {K} levels (more than max_levels={max_levels}); NUTS "
            f"differentiates through every level at each leapfrog step: pass num_steps=K with K <= 100"
        )
    runs, copies = (1, num_chains) if vectorize_chains else (num_chains, 1)
    program = noise_model if potential == "vectorized" else conditional_model

    def base(prior, observation, y):
        if not vectorize_chains:
            return program(prior, observation, y)
        with pyro.plate("chains", copies, dim=-1):
            return program(prior, observation, y)

    model = base
    if potential == "per-site":
        model = poutine.reparam(base, config={s: LocScaleReparam(centered=0.0) for s in names})
    generator = torch.Generator().manual_seed(seed)
    start_noise = None if init is None else _initial_noise(prior, init, num_chains, generator)
    evaluations = 0
    extra = 0
    start = time.perf_counter()
    noises: list[torch.Tensor] = []
    stiffness: list[torch.Tensor] = []
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
            if start_noise is not None:
                block = start_noise if vectorize_chains else start_noise[chain]
                block = block.to(y.dtype)
                if potential == "vectorized":
                    init_params = {site: block}
                else:
                    dim = 1 if vectorize_chains else 0
                    init_params = {f"{n}_decentered": block.select(dim, i) for i, n in enumerate(names)}
            preconditioner = None
            target = potential_fn
            if precondition:
                z0 = init_params[site].detach()
                batched = z0 if vectorize_chains else z0.unsqueeze(0)
                preconditioner = LowRankPreconditioner(prior, observation, batched)
                extra += observation.num_observations
                stiffness.append(preconditioner.stiffness)

                def target(params, potential_fn=potential_fn, pre=preconditioner):
                    return potential_fn({site: pre.forward(params["w"])})

                init_params = {"w": preconditioner.inverse(z0)}
                transforms = {}
            counted = CountedPotential(target)
            kernel = NUTS(
                potential_fn=counted,
                transforms=transforms,
                target_accept_prob=target_accept_prob,
                max_tree_depth=max_tree_depth,
                full_mass=full_mass,
            )
            record = {"lp": [], "step_size": [], "tree_size": []}
            last_calls = [0]

            def hook(kernel, params, stage, i, record=record, last_calls=last_calls, counted=counted):
                if stage == "Sample":
                    record["lp"].append(-counted.energy_at(params))
                    record["step_size"].append(float(kernel.step_size))
                    record["tree_size"].append(counted.calls - last_calls[0])
                last_calls[0] = counted.calls

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
            evaluations += counted.calls
            extra += counted.extra_calls
            samples = {k: v.detach() for k, v in mcmc.get_samples().items()}
            if preconditioner is not None:
                w = samples["w"] if vectorize_chains else samples["w"].unsqueeze(1)
                z = preconditioner.forward(w)
            elif potential == "vectorized":
                z = samples[site] if vectorize_chains else samples[site].unsqueeze(1)
            else:  # (draws, [C], *event) per site → (draws, C, K + 1, *event)
                z = torch.stack([samples[f"{n}_decentered"] for n in names], 1 + int(vectorize_chains))
                z = z if vectorize_chains else z.unsqueeze(1)
            noises.extend(z[:, c].detach() for c in range(copies))
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
    noise = torch.stack(noises)  # (C, N, K + 1, *event)
    with torch.no_grad():
        x0 = chain_x0(prior, noise)  # (C, N, *event)
    diagnostics = {
        "sample_stats": {k: torch.stack(v) for k, v in stats.items()},
        "noise": {f"{n}_decentered": noise.select(2, i) for i, n in enumerate(names)},
        "num_warmup": warmup_steps,
        "max_tree_depth": max_tree_depth,
        "target_accept_prob": target_accept_prob,
        "full_mass": full_mass,
        "jit_compile": jit_compile,
        "vectorized": vectorize_chains,
        "potential": potential,
        "init": "prior" if init is None else "draws",
        "precondition": precondition,
        "potential_evaluations": evaluations,
    }
    if stiffness:
        # sqrt(1 + s²) per copy and direction: the likelihood's narrowing at the start
        diagnostics["stiffness"] = torch.cat(stiffness)
    return PosteriorResult(
        draws=x0.reshape(-1, *diffusion.event_shape),
        diagnostics=diagnostics,
        seconds=seconds,
        network_calls=(evaluations + extra) * prior.network_calls_per_chain,
        method="nuts",
        num_steps=K,
        num_chains=num_chains,
    )
