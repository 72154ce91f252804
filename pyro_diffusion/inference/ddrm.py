r"""Denoising diffusion restoration models (DDRM: Kawar et al., 2022) for linear Gaussian
observations, on any grid of noise levels of any :class:`~pyro_diffusion.diffusion.Diffusion`.

In the SVD basis of ``A = U diag(s) V_hᵀ`` (``x̄ = V_h vec(x)``, ``ȳ_i = (Uᵀ y)_i / s_i``,
τ_i = σ_y / s_i for the r observed coordinates) and in the variance-exploding scale
``u_k = x_k / α_k`` with noise ``ς_k = σ_k / α_k`` (= e^{γ_k / 2}), each step from level k to
k − 1 takes the denoiser's x̂_0(x_k) and sets, coordinate by coordinate (ε ~ N(0, 1)),

.. math::

    \bar u_{k-1,i} =
    \begin{cases}
      \hat{\bar x}_i + \sqrt{1-η^2}\, ς_{k-1} \dfrac{\bar u_{k,i} - \hat{\bar x}_i}{ς_k} + η\, ς_{k-1} ε
        & i > r \text{ (unobserved)}\\[1ex]
      \hat{\bar x}_i + \sqrt{1-η^2}\, ς_{k-1} \dfrac{\bar y_i - \hat{\bar x}_i}{τ_i} + η\, ς_{k-1} ε
        & ς_{k-1} < τ_i\\[1ex]
      (1-η_b)\, \hat{\bar x}_i + η_b\, \bar y_i + \sqrt{ς_{k-1}^2 - η_b^2 τ_i^2}\; ε
        & ς_{k-1} \ge τ_i ,
    \end{cases}

and returns x̂_0 at the first level.  Not an exact sampler of p_θ(x_0 | y) (its steps are
DDIM-like with the observation pasted in the spectral domain); one network call per level,
without gradient.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..diffusion import Diffusion
from .observations import LinearObservation, check_conditioning
from .prior import frozen, inference_grid
from .result import PosteriorResult

__all__ = ["ddrm_sample"]


@torch.no_grad()
def ddrm_sample(
    diffusion: Diffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    num_samples: int,
    *,
    eta: float = 0.85,
    eta_b: float = 1.0,
    num_steps: int | None = None,
    progress: bool = False,
) -> PosteriorResult:
    """DDRM (module docstring): ``num_samples`` draws given one ``y`` ``(m,)`` on the grid
    ``num_steps`` (None: the model's own), with DDRM's η = ``eta`` and η_b = ``eta_b`` (the
    paper's defaults 0.85 and 1).  Returns a
    :class:`~pyro_diffusion.inference.result.PosteriorResult` (unweighted ``draws``)."""
    check_conditioning(diffusion, observation, y)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    for name, value in (("eta", eta), ("eta_b", eta_b)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    if isinstance(observation.noise_scale, torch.Tensor) and observation.noise_scale.numel() != 1:
        raise ValueError("observation: ddrm_sample needs a scalar noise_scale")
    if y.dim() != 1:
        raise ValueError(f"y: expected one observation of shape (m,), got {tuple(y.shape)}")
    grid = inference_grid(diffusion, num_steps)
    K = grid.shape[0]
    start = time.perf_counter()
    device, dtype, shape = diffusion.device, torch.get_default_dtype(), diffusion.event_shape
    n, D = num_samples, diffusion.event_size
    spectral = observation.svd()
    r = spectral.rank
    y_bar, tau, _ = spectral.project(y, float(observation.noise_scale))
    y_bar, tau, Vh = y_bar.to(device), tau.to(device), spectral.Vh.to(device)
    alphas = torch.sigmoid(-grid).sqrt()
    varsigma = torch.exp(0.5 * grid)  # σ/α
    x = torch.randn(n, *shape, device=device, dtype=dtype)
    calls = 0
    with frozen(diffusion):
        for k in tqdm(range(K, 0, -1), desc="DDRM", disable=not progress, leave=False):
            prediction, _ = diffusion.predict(
                x, grid[k - 1], grid[k - 2] if k > 1 else grid[0].new_tensor(-math.inf)
            )
            calls += 1
            x_hat = prediction.x0.reshape(n, D).to(torch.float64) @ Vh.T
            if k == 1:
                x = (x_hat @ Vh).to(dtype).reshape(n, *shape)
                break
            u = x.reshape(n, D).to(torch.float64) @ Vh.T / alphas[k - 1]
            s_prev, s_now = varsigma[k - 2], varsigma[k - 1]
            noise = torch.randn_like(u)
            new = x_hat + math.sqrt(1 - eta**2) * s_prev * (u - x_hat) / s_now + eta * s_prev * noise
            obs_hat = x_hat[:, :r]
            low = (
                x_hat[:, :r]
                + math.sqrt(1 - eta**2) * s_prev * (y_bar - obs_hat) / tau
                + eta * s_prev * noise[:, :r]
            )
            high_var = (s_prev**2 - (eta_b * tau) ** 2).clamp(min=0)
            high = (1 - eta_b) * obs_hat + eta_b * y_bar + high_var.sqrt() * noise[:, :r]
            new[:, :r] = torch.where(s_prev < tau, low, high)
            x = (alphas[k - 2] * new @ Vh).to(dtype).reshape(n, *shape)
    return PosteriorResult(
        draws=x,
        diagnostics={"eta": float(eta), "eta_b": float(eta_b)},
        seconds=time.perf_counter() - start,
        network_calls=calls,
        method="ddrm",
        num_steps=K,
    )
