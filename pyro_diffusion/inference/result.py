"""One result type for every posterior method of :mod:`pyro_diffusion.inference`.

:class:`PosteriorResult` holds what a conditional sampler produced: the draws of x_0 (weighted
or not), what the method reports about itself (``diagnostics``: ESS, sample statistics, loss
trace, ...), its cost (wall-clock seconds and denoiser evaluations) and the grid it ran on.
:meth:`PosteriorResult.sample` turns any of them into equally weighted draws, so downstream
code (energy distances, ArviZ, figures) does not depend on the method.

=================  ==========================================  =====================================
method             ``draws`` / ``log_weights``                 ``diagnostics``
=================  ==========================================  =====================================
``twisted_smc``    the K final particles, their normalized     ``ess``, ``resampled`` (T + 1,),
                   log weights                                 ``log_evidence``, ``num_particles``,
                                                               ``twist_variance``
``nuts``           C chains × N draws, chain-major             ``sample_stats`` {name: (C, N)},
                   (``num_chains`` = C), unweighted            ``noise`` {site: (C, N, *event)},
                                                               NUTS settings
``svi``            draws from the fitted q_φ(x_0); ``sample``  ``loc``, ``scale``, ``losses``,
                   draws afresh from q_φ                       ``num_particles``, ``lr``
``mcgdiff``        the R · N final particles of R runs,        ``ess``, ``resampled`` (R, K + 1),
                   run-major, their normalized log weights     ``log_evidence``,
                   (runs weighted by their evidence)           ``log_evidence_runs`` (R,), ``run``
``replacement``,   the independent draws, unweighted           the method's settings
``dps``, ``ddrm``
=================  ==========================================  =====================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["PosteriorResult"]


@dataclass
class PosteriorResult:
    """Draws of p_θ(x_0 | y) from one posterior method, with its diagnostics and cost.

    Attributes:
        draws: x_0 draws ``(n, *event_shape)``; for several chains chain-major, so that
            :meth:`chains` gives ``(num_chains, n // num_chains, *event_shape)``.
        log_weights: None (equally weighted draws) or normalized log weights ``(n,)``
            (logsumexp = 0), e.g. SMC's particles.
        diagnostics: what the method reports (see the module docstring).
        seconds: wall-clock time of the method.
        network_calls: denoiser evaluations (each on a batch; with a gradient for the
            gradient-based methods).
        method: the method's name (``"twisted_smc"``, ``"mcgdiff"``, ``"nuts"``, ``"svi"``,
            ``"replacement"``, ``"dps"``, ``"ddrm"``).
        num_steps: the number of noise levels of the chain the method ran on.
        num_chains: the number of chains in ``draws`` (1 unless MCMC ran several).
        sampler: ``(n, generator) -> (n, *event_shape)`` fresh draws, for methods with a
            generative posterior (SVI's q_φ); used by :meth:`sample` instead of resampling.
    """

    draws: torch.Tensor
    log_weights: torch.Tensor | None = None
    diagnostics: dict = field(default_factory=dict)
    seconds: float = float("nan")
    network_calls: int = 0
    method: str = ""
    num_steps: int | None = None
    num_chains: int = 1
    sampler: Callable | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.draws, torch.Tensor) or self.draws.dim() < 2:
            raise ValueError(f"draws: expected a tensor of shape (n, *event_shape), got {self.draws!r:.60}")
        n = self.draws.shape[0]
        if self.log_weights is not None and tuple(self.log_weights.shape) != (n,):
            raise ValueError(f"log_weights: expected shape ({n},), got {tuple(self.log_weights.shape)}")
        if isinstance(self.num_chains, bool) or not isinstance(self.num_chains, int) or self.num_chains < 1:
            raise ValueError(f"num_chains: expected a positive int, got {self.num_chains!r}")
        if n % self.num_chains:
            raise ValueError(f"num_chains: {self.num_chains} does not divide the {n} draws")

    @property
    def event_shape(self) -> torch.Size:
        return self.draws.shape[1:]

    @property
    def weights(self) -> torch.Tensor:
        """Normalized weights ``(n,)`` (uniform for unweighted draws)."""
        if self.log_weights is None:
            n = self.draws.shape[0]
            return torch.full((n,), 1.0 / n, dtype=torch.float64, device=self.draws.device)
        return self.log_weights.to(torch.float64).exp()

    @property
    def ess(self) -> float:
        """The effective sample size of the weights, 1/Σ w² (n for unweighted draws; for MCMC
        draws use ArviZ's ESS instead, which accounts for autocorrelation)."""
        w = self.weights
        return (1.0 / (w * w).sum()).item()

    def chains(self) -> torch.Tensor:
        """The draws as ``(num_chains, draws per chain, *event_shape)``."""
        return self.draws.reshape(self.num_chains, -1, *self.event_shape)

    def mean(self) -> torch.Tensor:
        """The (weighted) posterior mean of x_0, ``event_shape``, float64."""
        w = self.weights.reshape(-1, *(1,) * len(self.event_shape))
        return (w * self.draws.to(torch.float64)).sum(0)

    def sample(
        self, num_samples: int, generator: torch.Generator | None = None, scheme: str = "multinomial"
    ) -> torch.Tensor:
        """``num_samples`` equally weighted draws ``(num_samples, *event_shape)``: fresh draws
        when the method has a generative posterior (SVI), else resampling of the (weighted)
        draws by ``scheme``: ``"multinomial"`` (independent picks) or ``"systematic"`` (one
        uniform shift, ``num_samples`` evenly spaced points through the weights' CDF, then
        shuffled: with equal weights and ``num_samples`` = n every draw is kept once)."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        if scheme not in ("multinomial", "systematic"):
            raise ValueError(f"scheme: expected 'multinomial' or 'systematic', got {scheme!r}")
        if self.sampler is not None:
            return self.sampler(num_samples, generator)
        weights = self.weights.cpu()
        if scheme == "multinomial":
            index = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
        else:
            shift = torch.rand((), dtype=torch.float64, generator=generator)
            points = (shift + torch.arange(num_samples, dtype=torch.float64)) / num_samples
            cdf = weights.cumsum(-1)
            cdf[-1] = 1.0
            index = torch.searchsorted(cdf, points).clamp(max=weights.shape[0] - 1)
            index = index[torch.randperm(num_samples, generator=generator)]
        return self.draws[index.to(self.draws.device)]
