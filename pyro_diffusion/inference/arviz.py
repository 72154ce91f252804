r"""Hand inference results to ArviZ as :class:`arviz.InferenceData`.

Every posterior method returns a :class:`~pyro_diffusion.inference.result.PosteriorResult`;
:func:`from_result` picks the converter from what it holds.

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

import math
import warnings

import arviz as az
import numpy as np
import torch
import xarray as xr

from ..diffusion import Diffusion
from .result import PosteriorResult

__all__ = [
    "from_result",
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
    ``include_noise``), sample_stats ``diverging``, ``lp``, ``step_size``, ``tree_size``."""
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
    ``method``, ``num_steps``)."""
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
    trace ``loss (step)`` with attributes ``seconds`` and ``network_calls``."""
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
    (unweighted) draws as the posterior, ``(chain, draw, *event)``."""
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
