r"""Hand inference results to ArviZ as :class:`arviz.InferenceData`.

Every posterior method returns a :class:`~pyro_diffusion.inference.result.PosteriorResult`;
:func:`from_result` picks the converter from what it holds.

* :func:`from_runs` — several results of one method as the chains of one InferenceData
  (independent SMC or SVI runs, or heuristic runs, from :func:`independent_runs`), so that
  ``az.summary`` reports R-hat and ESS across them: R-hat far from 1 means the runs disagree.
  :func:`from_smc`, :func:`from_svi`, :func:`from_nuts` and :func:`from_result` accept a list
  of results too.
* :func:`from_pyro` — a user's own ``pyro.infer.MCMC`` run on a model that holds a
  :class:`~pyro_diffusion.inference.prior.DiffusionPrior`: posterior (x_0 included when the
  chain was non-centred), ``log_likelihood`` of the observed sites, ``observed_data``,
  ``diverging``; see its docstring for how it differs from ``az.from_pyro``.
* :func:`from_nuts` — posterior draws of x_0 ``(chain, draw, *event)`` with the sample
  statistics ArviZ knows (``diverging``, ``lp``, ``step_size``, ``tree_size``), ready for
  ``az.summary`` (R-hat, ESS) and ``az.plot_trace``/``az.plot_pair``.
* :func:`from_smc` — the SMC posterior as equally weighted draws (one "chain"), plus an
  ``smc_diagnostics`` group: the weighted particles, their log weights, the ESS and the
  resampling flag per step, and the log-evidence estimate.
* :func:`from_svi` — draws from the fitted guide and a ``loss`` group with the SVI loss trace.
* :func:`from_result` — any of the above, or the plain draws of a heuristic as one chain.
* :func:`from_bounds` — per-datum log-likelihood *bounds* ``ELBO_θ(x_0) ≤ log p_θ(x_0)`` on
  held-out data as the ``log_likelihood`` group (one draw: a bound, not posterior draws, so
  ``az.loo``/``az.waic`` do not apply) with the per-step terms beside it.
* :func:`paired_bound_difference` — the paired comparison of two models by their per-datum
  bounds on the same data: mean difference and its standard error.

ArviZ 0.x (the version this project pins, see ``pyproject.toml``) is assumed; ArviZ 1.x
replaced ``InferenceData`` by ``xarray.DataTree`` and is not supported here.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
import xarray as xr
from pyro import poutine
from pyro.infer import Predictive
from pyro.poutine.util import prune_subsample_sites

from ..diffusion import Diffusion
from .result import PosteriorResult

__all__ = [
    "from_result",
    "from_runs",
    "independent_runs",
    "from_pyro",
    "from_nuts",
    "from_smc",
    "from_svi",
    "from_bounds",
    "paired_bound_difference",
    "event_dims_names",
]


def event_dims_names(event_shape) -> list[str]:
    """ArviZ dimension names for one datum: ``["coordinate"]`` for vectors, else
    ``["channel", "row", "column"]`` (images) or ``["dim_0", …]``."""
    event_shape = tuple(event_shape)
    if len(event_shape) == 1:
        return ["coordinate"]
    if len(event_shape) == 3:
        return ["channel", "row", "column"]
    return [f"dim_{i}" for i in range(len(event_shape))]


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _add_group(idata: az.InferenceData, name: str, dataset: xr.Dataset) -> az.InferenceData:
    with warnings.catch_warnings():  # groups outside ArviZ's schema are allowed, with a warning
        warnings.filterwarnings("ignore", message=".*not defined in the InferenceData scheme.*")
        idata.add_groups({name: dataset})
    return idata


def _check_result(result, argument: str = "result") -> PosteriorResult:
    if not isinstance(result, PosteriorResult):
        raise TypeError(f"{argument}: expected a PosteriorResult, got {type(result).__name__}")
    return result


def _cost_attrs(result: PosteriorResult) -> dict:
    attrs = {"method": result.method, "seconds": result.seconds, "network_calls": result.network_calls}
    if result.num_steps is not None:
        attrs["num_steps"] = result.num_steps
    return attrs


def from_nuts(result: PosteriorResult, var_name: str = "x0", include_noise: bool = False) -> az.InferenceData:
    """InferenceData from :func:`~pyro_diffusion.inference.nuts.nuts_conditional`: posterior
    ``var_name`` ``(chain, draw, *event)`` (and the non-centred noises when
    ``include_noise``), sample_stats ``diverging``, ``lp``, ``step_size``, ``tree_size``.
    A list of results: their chains side by side (:func:`from_runs`)."""
    if _is_sequence(result):
        if include_noise:
            raise ValueError("include_noise: not available for a list of results")
        return from_runs(result, var_name)
    _check_result(result)
    if "sample_stats" not in result.diagnostics:
        raise ValueError(f"result: expected an MCMC result with sample_stats, got method {result.method!r}")
    dims = event_dims_names(result.event_shape)
    posterior = {var_name: _numpy(result.chains())}
    dim_map = {var_name: dims}
    if include_noise:
        for site, value in result.diagnostics.get("noise", {}).items():
            posterior[site] = _numpy(value)
            dim_map[site] = dims
    stats = {k: _numpy(v) for k, v in result.diagnostics["sample_stats"].items()}
    idata = az.from_dict(posterior=posterior, sample_stats=stats, dims=dim_map)
    idata.posterior.attrs.update(_cost_attrs(result))
    return idata


def from_smc(
    result: PosteriorResult, var_name: str = "x0", num_draws: int | None = None, seed: int = 0
) -> az.InferenceData:
    """InferenceData from :func:`~pyro_diffusion.inference.smc.twisted_smc`.

    ``posterior``: ``num_draws`` (default K) equally weighted draws, multinomially resampled
    from the weighted particles with generator seed ``seed``, as one chain.
    ``smc_diagnostics``: ``particles`` ``(particle, *event)``, ``log_weight`` ``(particle,)``,
    ``ess`` and ``resampled`` ``(step,)`` (step 0 = after x_K, step K = after x_0),
    ``log_evidence`` (a scalar), with attributes ``seconds``, ``network_calls`` (and
    ``method``, ``num_steps``).

    One run is one chain, for which ``az.summary`` has no R-hat (NaN, with a shape warning):
    pass a list of independent runs (:func:`independent_runs`) to get one chain per run
    (:func:`from_runs`)."""
    if _is_sequence(result):
        return from_runs(result, var_name, num_draws=num_draws, seed=seed)
    _check_result(result)
    if result.log_weights is None or "ess" not in result.diagnostics:
        raise ValueError(f"result: expected a weighted SMC result, got method {result.method!r}")
    num_draws = num_draws or result.draws.shape[0]
    generator = torch.Generator().manual_seed(seed)
    draws = result.sample(num_draws, generator=generator)
    dims = event_dims_names(result.event_shape)
    idata = az.from_dict(posterior={var_name: _numpy(draws)[None]}, dims={var_name: dims})
    diag = result.diagnostics
    diagnostics = xr.Dataset(
        {
            "particles": (["particle", *dims], _numpy(result.draws)),
            "log_weight": (["particle"], _numpy(result.log_weights)),
            "ess": (["step"], _numpy(diag["ess"])),
            "resampled": (["step"], _numpy(diag["resampled"])),
            "log_evidence": ((), np.asarray(diag["log_evidence"])),
        },
        attrs=_cost_attrs(result),
    )
    return _add_group(idata, "smc_diagnostics", diagnostics)


def from_svi(
    result: PosteriorResult, var_name: str = "x0", num_draws: int = 1000, seed: int = 0
) -> az.InferenceData:
    """InferenceData from :func:`~pyro_diffusion.inference.svi.svi_conditional`: ``posterior``
    holds ``num_draws`` draws of the fitted q_φ(x_0) (one chain), the ``loss`` group the loss
    trace ``loss (step)`` with attributes ``seconds`` and ``network_calls``.  A list of
    independent fits (e.g. other seeds, :func:`independent_runs`): one chain per fit
    (:func:`from_runs`), ``loss (chain, step)``."""
    if _is_sequence(result):
        return from_runs(result, var_name, num_draws=num_draws, seed=seed)
    _check_result(result)
    if "losses" not in result.diagnostics:
        raise ValueError(f"result: expected an SVI result with a loss trace, got method {result.method!r}")
    generator = torch.Generator().manual_seed(seed)
    draws = result.sample(num_draws, generator=generator)
    dims = event_dims_names(result.event_shape)
    idata = az.from_dict(posterior={var_name: _numpy(draws)[None]}, dims={var_name: dims})
    loss = xr.Dataset(
        {"loss": (["step"], np.asarray(result.diagnostics["losses"], dtype=np.float64))},
        attrs=_cost_attrs(result),
    )
    return _add_group(idata, "loss", loss)


def from_result(result: PosteriorResult, var_name: str = "x0", **kwargs) -> az.InferenceData:
    """InferenceData from any posterior method: :func:`from_nuts` for MCMC results,
    :func:`from_smc` for weighted particles, :func:`from_svi` for SVI, and otherwise the
    (unweighted) draws as the posterior, ``(chain, draw, *event)``.  A list of results of one
    method: :func:`from_runs`."""
    if _is_sequence(result):
        return from_runs(result, var_name, **kwargs)
    _check_result(result)
    if "sample_stats" in result.diagnostics:
        return from_nuts(result, var_name, **kwargs)
    if result.log_weights is not None and "ess" in result.diagnostics:
        return from_smc(result, var_name, **kwargs)
    if "losses" in result.diagnostics:
        return from_svi(result, var_name, **kwargs)
    if kwargs:
        raise TypeError(f"from_result: unexpected arguments {sorted(kwargs)} for method {result.method!r}")
    if result.log_weights is not None:
        raise ValueError(
            "result: weighted draws without SMC diagnostics; resample them with result.sample(n)"
        )
    dims = event_dims_names(result.event_shape)
    idata = az.from_dict(posterior={var_name: _numpy(result.chains())}, dims={var_name: dims})
    idata.posterior.attrs.update(_cost_attrs(result))
    return idata


# ---------------------------------------------------------------------- several runs as chains
def _is_sequence(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _kind(result: PosteriorResult) -> str:
    if "sample_stats" in result.diagnostics:
        return "nuts"
    if result.log_weights is not None and "ess" in result.diagnostics:
        return "smc"
    if "losses" in result.diagnostics:
        return "svi"
    if result.log_weights is not None:
        raise ValueError(
            "results: weighted draws without SMC diagnostics; resample them with result.sample(n)"
        )
    return "draws"


def independent_runs(method: Callable, *args, num_runs: int = 4, seed: int = 0, **kwargs) -> list:
    """``num_runs`` independent runs of a posterior method, run r with seed ``seed + r``:
    passed as ``seed=`` when ``method`` takes one (``twisted_smc``, ``svi_conditional``,
    ``nuts_conditional``), else set with ``pyro.set_rng_seed`` before the call (the
    heuristics).  ``args``/``kwargs`` go to every call.  Returns the list of results, for
    :func:`from_runs`.

    Example::

        runs = independent_runs(twisted_smc, diffusion, observation, y, num_particles=500, num_runs=4)
        idata = from_runs(runs)          # 4 chains; az.summary(idata) has R-hat across the runs
    """
    if not callable(method):
        raise TypeError(f"method: expected a callable returning a PosteriorResult, got {method!r:.60}")
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"num_runs: expected a positive int, got {num_runs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    try:
        takes_seed = "seed" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        takes_seed = False
    results = []
    for r in range(num_runs):
        if takes_seed:
            result = method(*args, seed=seed + r, **kwargs)
        else:
            pyro.set_rng_seed(seed + r)
            result = method(*args, **kwargs)
        results.append(_check_result(result, "method"))
    return results


def from_runs(
    results: Sequence[PosteriorResult], var_name: str = "x0", num_draws: int | None = None, seed: int = 0
) -> az.InferenceData:
    """Several results of one method as the chains of one InferenceData.

    Each run gives its equally weighted draws as chains: SMC ``num_draws`` (default: its
    particle count) multinomial resamples of its particles, SVI ``num_draws`` (default: the
    draws it kept) draws of its q_φ, NUTS its own chains, a heuristic its draws (the first
    ``num_draws``); run r's resampling uses generator seed ``seed + r``.  The runs must give
    the same number of draws per chain.  ``az.summary`` then reports R-hat and ESS across the
    runs: for independent SMC runs or SVI fits from other seeds, R-hat far above 1 says the
    runs disagree (a wrong mode weight, a fit stuck in another mode), which one run's ESS
    cannot show.  Groups beside the posterior, with a leading ``chain`` dimension: SMC's
    ``smc_diagnostics`` (``particles``, ``log_weight``, ``ess``, ``resampled``,
    ``log_evidence (chain,)``), SVI's ``loss (chain, step)``, NUTS's ``sample_stats``."""
    if not _is_sequence(results) or len(results) == 0:
        raise ValueError(f"results: expected a non-empty list of PosteriorResult, got {results!r:.60}")
    results = [_check_result(r, f"results[{i}]") for i, r in enumerate(results)]
    if num_draws is not None and (
        isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1
    ):
        raise ValueError(f"num_draws: expected None or a positive int, got {num_draws!r}")
    kinds = {_kind(r) for r in results}
    if len(kinds) > 1:
        raise ValueError(f"results: expected results of one method, got {sorted(r.method for r in results)}")
    kind = kinds.pop()
    shapes = {tuple(r.event_shape) for r in results}
    if len(shapes) > 1:
        raise ValueError(f"results: expected one event shape, got {sorted(shapes)}")
    chains = []
    for r, result in enumerate(results):
        if kind in ("smc", "svi"):
            n = num_draws or result.draws.shape[0]
            generator = torch.Generator().manual_seed(seed + r)
            chains.append(result.sample(n, generator=generator)[None])
        else:
            draws = result.chains()
            if num_draws is not None:
                if num_draws > draws.shape[1]:
                    raise ValueError(
                        f"num_draws: {num_draws} is more than the {draws.shape[1]} draws of results[{r}]"
                    )
                draws = draws[:, :num_draws]
            chains.append(draws)
    lengths = sorted({c.shape[1] for c in chains})
    if len(lengths) > 1:
        raise ValueError(f"results: expected the same number of draws per chain, got {lengths}")
    dims = event_dims_names(results[0].event_shape)
    posterior = {var_name: _numpy(torch.cat(chains))}
    sample_stats = None
    if kind == "nuts":
        sample_stats = {
            key: np.concatenate([_numpy(r.diagnostics["sample_stats"][key]) for r in results])
            for key in results[0].diagnostics["sample_stats"]
        }
    idata = az.from_dict(posterior=posterior, sample_stats=sample_stats, dims={var_name: dims})
    idata.posterior.attrs.update(
        {
            "method": results[0].method,
            "num_runs": len(results),
            "seconds": float(sum(r.seconds for r in results)),
            "network_calls": int(sum(r.network_calls for r in results)),
        }
    )
    if results[0].num_steps is not None:
        idata.posterior.attrs["num_steps"] = results[0].num_steps
    if kind == "smc":
        counts = {r.draws.shape[0] for r in results}
        steps = {r.diagnostics["ess"].shape[0] for r in results}
        if len(counts) > 1 or len(steps) > 1:
            raise ValueError("results: SMC runs with different particle counts or grids")
        diagnostics = xr.Dataset(
            {
                "particles": (["chain", "particle", *dims], np.stack([_numpy(r.draws) for r in results])),
                "log_weight": (["chain", "particle"], np.stack([_numpy(r.log_weights) for r in results])),
                "ess": (["chain", "step"], np.stack([_numpy(r.diagnostics["ess"]) for r in results])),
                "resampled": (
                    ["chain", "step"],
                    np.stack([_numpy(r.diagnostics["resampled"]) for r in results]),
                ),
                "log_evidence": (["chain"], np.asarray([r.diagnostics["log_evidence"] for r in results])),
            },
            attrs=dict(idata.posterior.attrs),
        )
        _add_group(idata, "smc_diagnostics", diagnostics)
    elif kind == "svi":
        steps = {len(r.diagnostics["losses"]) for r in results}
        if len(steps) > 1:
            raise ValueError(f"results: SVI fits with different numbers of steps {sorted(steps)}")
        losses = np.asarray([r.diagnostics["losses"] for r in results], dtype=np.float64)
        _add_group(
            idata,
            "loss",
            xr.Dataset({"loss": (["chain", "step"], losses)}, attrs=dict(idata.posterior.attrs)),
        )
    return idata


# ---------------------------------------------------------------------- a user's own MCMC run
def _is_deterministic(fn) -> bool:
    """A point mass: ``pyro.deterministic`` sites and the sites a reparameterizer replaced
    (``Delta``, possibly masked or made independent)."""
    while isinstance(fn, (dist.MaskedDistribution, dist.Independent)):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def _read_trace(trace, sampled) -> tuple[dict, dict, dict, dict]:
    """(deterministic values, observed values, observed log-likelihoods, event shapes of all
    sample sites) of a trace of the model conditioned on the ``sampled`` sites."""
    values, observed, log_lik, events = {}, {}, {}, {}
    for site_name, site in prune_subsample_sites(trace).nodes.items():
        if site["type"] != "sample":
            continue
        events[site_name] = tuple(site["fn"].event_shape)
        if _is_deterministic(site["fn"]):
            values[site_name] = site["value"].detach()
        elif site["is_observed"] and site_name not in sampled:
            observed[site_name] = site["value"].detach()
            log_lik[site_name] = site["fn"].log_prob(site["value"]).detach()
    return values, observed, log_lik, events


def from_pyro(
    mcmc: pyro.infer.MCMC | Sequence[pyro.infer.MCMC],
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    model: Callable | None = None,
    name: str = "x",
    var_name: str = "x0",
    include_chain: bool = False,
    vectorize: bool = True,
) -> az.InferenceData:
    r"""InferenceData from a user's ``pyro.infer.MCMC`` run on a model holding a
    :class:`~pyro_diffusion.inference.prior.DiffusionPrior` (called as ``prior(name)``).

    ``mcmc``: one run (its chains), or a list of runs of the same model and sizes (e.g.
    single-chain runs with other seeds, one after another) whose chains are put side by side.

    ``model_args``/``model_kwargs``: the arguments ``mcmc.run`` was given; ``model``: the
    model (default: the kernel's, ``mcmc.kernel.model``).  Groups:

    * ``posterior``: the sampled sites other than the chain's, the model's deterministic sites,
      and the chain's x_0 as ``var_name`` ``(chain, draw, *batch, *event)`` — read off the
      model run at each draw, so it is there when NUTS sampled the non-centred noises
      (``prior.reparam_config(name)``) and x_0 is no sample site.  ``include_chain=True``
      keeps every site of the chain (``{name}/x_K …``, and their ``…_decentered`` noises).
    * ``log_likelihood``: ``log p(obs | draw)`` of every observed site, element-wise over its
      batch (plate) dimensions, ``(chain, draw, *batch)``; ``observed_data``: their values.
    * ``sample_stats``: ``diverging`` (from ``mcmc.diagnostics()``).

    How this differs from ``az.from_pyro(mcmc)``: that one evaluates the log-likelihood in one
    vectorized run of the model over all draws (``Predictive.get_vectorized_trace``), which
    needs every tensor in the model to broadcast against an extra leading sample dimension; a
    global site that is used against a plate's batch without indexing (``Normal(x, sigma)``
    with ``x`` of shape ``(n, D)``: write ``sigma[..., None]``, one ``None`` per event
    dimension of ``x``) breaks that and ArviZ drops the group with "Could not get vectorized
    trace".  It also lists the sites a reparameterizer replaced as observed data and their
    (zero) point-mass log densities as likelihoods.  Here the vectorized run is tried first
    (``vectorize``) and kept only when it reproduces, at the first and the last draw, what the
    model run at that single draw gives (a model that broadcasts wrongly can run vectorized
    and give wrong shapes); otherwise the model is run once per draw (``draws × K`` network
    calls, no gradient).  Sites whose distribution is a point mass (``pyro.deterministic``,
    reparameterized sites) are values, never observations.  ``posterior.attrs
    ["log_likelihood_evaluation"]`` says which way was taken."""
    if not isinstance(model_args, tuple):
        raise TypeError(
            f"model_args: expected a tuple of the arguments mcmc.run was given, got {type(model_args).__name__}"
        )
    model_kwargs = {} if model_kwargs is None else dict(model_kwargs)
    runs = list(mcmc) if _is_sequence(mcmc) else [mcmc]
    if not runs:
        raise ValueError("mcmc: expected an MCMC or a non-empty list of MCMC runs")
    parts = [
        _mcmc_groups(
            run, model, model_args, model_kwargs, name, var_name, include_chain, vectorize, f"mcmc[{i}]"
        )
        for i, run in enumerate(runs)
    ]
    groups = {}
    for g in ("posterior", "log_likelihood", "sample_stats"):
        keys = [sorted(p[g]) for p in parts]
        if any(k != keys[0] for k in keys):
            raise ValueError(f"mcmc: the runs have different sites in {g}: {keys}")
        lengths = {v.shape[1] for p in parts for v in p[g].values()}
        if len(lengths) > 1:
            raise ValueError(f"mcmc: the runs have different numbers of draws {sorted(lengths)}")
        groups[g] = {k: np.concatenate([p[g][k] for p in parts]) for k in keys[0]} or None
    idata = az.from_dict(
        posterior=groups["posterior"],
        sample_stats=groups["sample_stats"],
        log_likelihood=groups["log_likelihood"],
        observed_data=parts[0]["observed_data"] or None,
        dims=parts[0]["dims"],
    )
    hows = sorted({p["how"] for p in parts})
    idata.posterior.attrs["log_likelihood_evaluation"] = hows[0] if len(hows) == 1 else ", ".join(hows)
    return idata


def _mcmc_groups(mcmc, model, model_args, model_kwargs, name, var_name, include_chain, vectorize, argument):
    """The groups of :func:`from_pyro` for one MCMC run, as arrays ``(chain, draw, ...)``."""
    if not isinstance(mcmc, pyro.infer.MCMC):
        raise TypeError(f"{argument}: expected a pyro.infer.MCMC that has run, got {type(mcmc).__name__}")
    model = model if model is not None else getattr(mcmc.kernel, "model", None)
    if model is None:
        raise ValueError("model: the kernel has no model (built from a potential_fn); pass model=")
    grouped = {k: v.detach() for k, v in mcmc.get_samples(group_by_chain=True).items()}
    if not grouped:
        raise ValueError(f"{argument}: holds no samples; call mcmc.run(...) first")
    C, N = next(iter(grouped.values())).shape[:2]
    S = C * N
    flat = {k: v.reshape(S, *v.shape[2:]) for k, v in grouped.items()}

    def run_at(i: int):
        draw = {k: v[i] for k, v in flat.items()}
        with torch.no_grad():
            trace = poutine.trace(poutine.condition(model, data=draw)).get_trace(*model_args, **model_kwargs)
        return _read_trace(trace, flat)

    first, last = run_at(0), run_at(S - 1)
    stacked = None
    how = "sequential"
    if vectorize:
        try:
            with torch.no_grad():
                trace = Predictive(model, posterior_samples=flat).get_vectorized_trace(
                    *model_args, **model_kwargs
                )
            vectorized = _read_trace(trace, flat)
            stacked = tuple({} for _ in range(3))
            for index, (part, reference, end, out) in enumerate(
                zip(vectorized[:3], first[:3], last[:3], stacked)
            ):
                if set(part) != set(reference):
                    raise ValueError("different sites")
                for key, value in part.items():
                    if index == 1:  # the observed values are the data, not per draw
                        out[key] = reference[key]
                        continue
                    value = value.reshape(S, *reference[key].shape)
                    if not (
                        torch.allclose(value[0], reference[key], rtol=1e-4, atol=1e-5)
                        and torch.allclose(value[-1], end[key], rtol=1e-4, atol=1e-5)
                    ):
                        raise ValueError(f"{key} differs")
                    out[key] = value
            how = "vectorized"
        except Exception:  # noqa: BLE001 — any failure of the vectorized run: run per draw
            stacked = None
    if stacked is None:
        runs = [first] + [run_at(i) for i in range(1, S - 1)] + ([last] if S > 1 else [])
        stacked = (
            {k: torch.stack([r[0][k] for r in runs]) for k in first[0]},
            first[1],
            {k: torch.stack([r[2][k] for r in runs]) for k in first[2]},
        )
    values, observed, log_lik = stacked
    events = first[3]
    prefix = f"{name}/"
    chain_x0 = f"{prefix}x_0"
    posterior, dims = {}, {}
    sources = {**{k: v for k, v in flat.items()}, **values}
    for key, value in sources.items():
        if key.startswith(prefix) and not include_chain:
            continue
        posterior[key] = _numpy(value.reshape(C, N, *value.shape[1:]))
    if chain_x0 in sources:
        x0 = sources[chain_x0]
        posterior[var_name] = _numpy(x0.reshape(C, N, *x0.shape[1:]))
        event = events[chain_x0]
        batch = x0.dim() - 1 - len(event)
        dims[var_name] = [f"{var_name}_dim_{i}" for i in range(batch)] + event_dims_names(event)
    divergences = mcmc.diagnostics().get("divergences", {})
    diverging = np.zeros((C, N), dtype=bool)
    for c, key in enumerate(sorted(divergences, key=lambda k: int(str(k).split()[-1]))):
        diverging[c, np.asarray(divergences[key], dtype=np.int64)] = True
    return {
        "posterior": posterior,
        "sample_stats": {"diverging": diverging},
        "log_likelihood": {k: _numpy(v.reshape(C, N, *v.shape[1:])) for k, v in log_lik.items()},
        "observed_data": {k: _numpy(v) for k, v in observed.items()},
        "dims": dims,
        "how": how,
    }


def from_bounds(
    diffusion: Diffusion, x0: torch.Tensor, var_name: str = "x", num_draws: int = 1, **vlb_kwargs
) -> az.InferenceData:
    r"""Per-datum bounds on held-out data as InferenceData.

    ``log_likelihood[var_name]`` ``(chain=1, draw=1, datum)`` holds ELBO_θ(x_0) = −Σ_t L_t in
    nats (the mean of ``num_draws`` independent Monte Carlo estimates of a lower bound on
    log p_θ(x_0), each from :meth:`Diffusion.vlb_terms <pyro_diffusion.diffusion.Diffusion.vlb_terms>`);
    ``bound_terms`` holds the terms ``L_t (datum, term)`` (term 0 the decoder, T the prior) and
    ``bits_per_dim (datum,)``; ``observed_data`` holds x_0.  ``vlb_kwargs`` go to
    ``vlb_terms`` (e.g. ``num_steps=K`` for the bound on a K-level grid)."""
    if not isinstance(diffusion, Diffusion):
        raise TypeError(f"diffusion: expected a Diffusion, got {type(diffusion).__name__}")
    if not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"num_draws: expected a positive int, got {num_draws!r}")
    terms = sum(diffusion.vlb_terms(x0, **vlb_kwargs).to(torch.float64) for _ in range(num_draws)) / num_draws
    elbo = -terms.sum(-1)
    dims = event_dims_names(x0.shape[1:])
    idata = az.InferenceData(
        log_likelihood=az.dict_to_dataset({var_name: _numpy(elbo)[None, None]}, dims={var_name: ["datum"]}),
        observed_data=az.dict_to_dataset(
            {var_name: _numpy(x0)}, default_dims=[], dims={var_name: ["datum", *dims]}
        ),
    )
    bits = -elbo / (diffusion.event_size * math.log(2))
    bound_terms = xr.Dataset(
        {
            "terms": (["datum", "term"], _numpy(terms)),
            "bits_per_dim": (["datum"], _numpy(bits)),
        },
        coords={"term": np.arange(terms.shape[1])},
        attrs={"units": "nats (terms), bits per dimension (bits_per_dim)"},
    )
    return _add_group(idata, "bound_terms", bound_terms)


def _per_datum(value, var_name: str) -> np.ndarray:
    if isinstance(value, az.InferenceData):
        array = value.log_likelihood[var_name].values
        return array.reshape(-1, array.shape[-1]).mean(0)
    if isinstance(value, torch.Tensor):
        return _numpy(value).astype(np.float64)
    return np.asarray(value, dtype=np.float64)


def paired_bound_difference(first, second, var_name: str = "x", event_size: int | None = None) -> dict:
    r"""Paired comparison of two models by per-datum bounds on the *same* data.

    ``first``/``second``: :func:`from_bounds` results (or arrays ``(N,)`` of per-datum ELBOs
    in nats).  With d_i = ELBO_1(x_i) − ELBO_2(x_i), returns ``mean`` = d̄ and ``se`` =
    sd(d)/√N (nats per datum; positive favours ``first``), ``z`` = d̄/se, ``n``, and, when
    ``event_size`` D is given, the same in bits per dimension (``mean_bpd``, ``se_bpd``:
    divided by D ln 2, sign flipped so that positive means ``first`` needs fewer bits)."""
    a, b = _per_datum(first, var_name), _per_datum(second, var_name)
    if a.shape != b.shape or a.ndim != 1 or a.shape[0] < 2:
        raise ValueError(
            f"first, second: expected per-datum bounds on the same N >= 2 data, got {a.shape}, {b.shape}"
        )
    diff = a - b
    n = diff.shape[0]
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(n))
    out = {"mean": mean, "se": se, "z": mean / se if se > 0 else math.inf, "n": n}
    if event_size is not None:
        scale = event_size * math.log(2)
        out.update({"mean_bpd": mean / scale, "se_bpd": se / scale})
    return out
