r"""The trained reverse chain as a prior inside a user's Pyro model.

:class:`DiffusionPrior` samples the reverse chain

.. math::

    x_T \sim \mathcal N(0, I),\qquad x_{t-1} \sim p_θ(x_{t-1} \mid x_t)\ (t = T..2),\qquad
    x_0 \sim p_θ(x_0 \mid x_1)

as Pyro sites ``{name}/x_T … {name}/x_1, {name}/x_0`` and returns x_0, so that
``x = prior("image")`` can stand wherever a user's model would write
``x = pyro.sample("image", SomePrior)``.  Three properties make it composable:

* **Scoped sites.** Every site carries the caller's ``name`` as a prefix, so two uses (two
  images, or a prior inside a plate and another outside) never collide.
* **Frozen parameters by default.** The denoiser runs with its parameters' ``requires_grad``
  switched off for the duration of the call and is never entered into Pyro's param store
  (no ``pyro.module``), so a user's SVI neither trains nor overwrites the diffusion: gradients
  flow to the x_t (as samplers need) but not to the weights.  ``fine_tune=True`` registers the
  diffusion under ``module_name`` instead, and then the user's optimizer trains it.
* **Batch shapes from the user's plates.** No plate of its own: the first site has batch
  shape ``()`` and Pyro's plates broadcast it, so inside ``pyro.plate("images", n)`` the prior
  draws n independent x_0 of shape ``(n, *event_shape)``; nested plates and vectorized
  particles (``num_particles`` with ``vectorize_particles=True``, ``Predictive(parallel=True)``)
  work alike.  The denoiser sees the leading dimensions flattened into one batch.

For data with a discretized decoder, ``decoder="gaussian"`` replaces the last step by its
continuous relaxation ``N(μ_θ(x_1, 1), σ_1²)`` so that x_0 is a continuous latent (needed by
NUTS, SVI with reparameterized guides, and gradient-based samplers).
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import torch

from ..chains import site_name
from ..decoders import decoder_distribution
from ..diffusion import GaussianDiffusion
from ..parameterization import predict_eps, predict_x0_from_eps

__all__ = ["DiffusionPrior", "frozen", "reverse_step", "reverse_step_and_x0", "predict_x0"]


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Switch off ``requires_grad`` of ``module``'s parameters inside the block (restored after):
    the autograd graph built inside treats the weights as constants."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _flat(diffusion: GaussianDiffusion, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    event_dims = diffusion.event_dims
    if tuple(x.shape[x.dim() - event_dims :]) != tuple(diffusion.event_shape):
        raise ValueError(f"x_t: expected trailing shape {tuple(diffusion.event_shape)}, got {tuple(x.shape)}")
    lead = x.shape[: x.dim() - event_dims]
    return x.reshape(-1, *diffusion.event_shape), lead


def reverse_step(
    diffusion: GaussianDiffusion, x_t: torch.Tensor, t: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_θ(x_t, t), log σ_t²) for x_t of any leading shape ``(*batch, *event_shape)``; the
    returned mean has x_t's shape and the log-variance broadcasts against it."""
    flat, lead = _flat(diffusion, x_t)
    steps = torch.full((flat.shape[0],), t, dtype=torch.long, device=flat.device)
    loc, log_var, _ = diffusion.reverse_mean_log_variance(flat, steps)
    log_var = log_var.expand_as(loc)
    return loc.reshape(x_t.shape), log_var.reshape(x_t.shape)


def reverse_step_and_x0(
    diffusion: GaussianDiffusion, x_t: torch.Tensor, t: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(μ_θ(x_t, t), log σ_t², x̂_0(x_t)) from one network call, for x_t of any leading shape
    ``(*batch, *event_shape)`` (all three returned in x_t's shape); x̂_0 as in :func:`predict_x0`."""
    flat, _ = _flat(diffusion, x_t)
    steps = torch.full((flat.shape[0],), t, dtype=torch.long, device=flat.device)
    loc, log_var, mean_output = diffusion.reverse_mean_log_variance(flat, steps)
    schedule = diffusion.schedule
    eps = predict_eps(schedule, diffusion.mean, flat, steps, mean_output)
    x0 = predict_x0_from_eps(schedule, flat, steps, eps)
    shape = x_t.shape
    return loc.reshape(shape), log_var.expand_as(loc).reshape(shape), x0.reshape(shape)


def predict_x0(diffusion: GaussianDiffusion, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """The denoiser's estimate x̂_0(x_t) = (x_t − √(1−ᾱ_t) ε̂_θ(x_t, t)) / √ᾱ_t (Tweedie's
    formula for E[x_0 | x_t] when ε̂_θ is exact), for x_t of any leading shape."""
    return reverse_step_and_x0(diffusion, x_t, t)[2]


class DiffusionPrior:
    r"""A trained :class:`~pyro_diffusion.GaussianDiffusion` as a prior over x_0 in any Pyro model.

    Args:
        diffusion: the trained diffusion.
        fine_tune: register the diffusion's parameters with ``pyro.module(module_name, …)`` so
            that the user's optimizer trains them (default False: frozen, see module docstring).
        module_name: the param-store name used when ``fine_tune`` (default: ``diffusion.name``).
        decoder: ``"model"`` (default: the diffusion's own decoder) or ``"gaussian"`` (the
            continuous relaxation of a discretized decoder, for gradient-based inference).

    Example::

        prior = DiffusionPrior(diffusion)

        def model(y):
            sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
            with pyro.plate("images", y.shape[0]):
                x = prior("x")                     # sites x/x_T … x/x_0, shape (n, 1, 8, 8)
                pyro.sample("y", dist.Normal(x, sigma).to_event(3), obs=y)
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        *,
        fine_tune: bool = False,
        module_name: str | None = None,
        decoder: str = "model",
    ) -> None:
        if not isinstance(diffusion, GaussianDiffusion):
            raise TypeError(f"diffusion: expected a GaussianDiffusion, got {type(diffusion).__name__}")
        if decoder not in ("model", "gaussian"):
            raise ValueError(f"decoder: expected 'model' or 'gaussian', got {decoder!r}")
        self.diffusion = diffusion
        self.fine_tune = bool(fine_tune)
        self.module_name = module_name or diffusion.name
        self.decoder = decoder

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_steps

    @property
    def event_shape(self) -> torch.Size:
        return self.diffusion.event_shape

    def site_names(self, name: str) -> list[str]:
        """The sites the prior samples under ``name``, in order: x_T … x_1, x_0."""
        return [site_name(t, f"{name}/") for t in range(self.num_steps, -1, -1)]

    def step_distribution(self, x_t: torch.Tensor, t: int) -> dist.Distribution:
        """p_θ(x_{t-1} | x_t) with event shape ``event_shape`` (the decoder at t = 1)."""
        loc, log_var = reverse_step(self.diffusion, x_t, t)
        event_dims = self.diffusion.event_dims
        if t == 1 and self.decoder == "model":
            d = self.diffusion
            return decoder_distribution(d.decoder, loc, log_var, d.num_levels).to_event(event_dims)
        return dist.Normal(loc, torch.exp(0.5 * log_var)).to_event(event_dims)

    def __call__(self, name: str, *, obs: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the chain as sites ``{name}/x_T … {name}/x_0`` and return x_0 (observed when
        ``obs`` is given, of shape ``(*batch, *event_shape)``)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string to scope the sites, got {name!r}")
        d = self.diffusion
        device = d.schedule.betas.device
        dtype = obs.dtype if obs is not None else torch.get_default_dtype()
        if obs is not None:
            event_dims = d.event_dims
            if tuple(obs.shape[obs.dim() - event_dims :]) != tuple(d.event_shape):
                raise ValueError(
                    f"obs: expected trailing shape {tuple(d.event_shape)}, got {tuple(obs.shape)}"
                )
        if self.fine_tune:
            pyro.module(self.module_name, d)
            context = contextlib.nullcontext()
        else:
            context = frozen(d)
        with context:
            zeros = torch.zeros(d.event_shape, dtype=dtype, device=device)
            x_t = pyro.sample(
                site_name(self.num_steps, f"{name}/"), dist.Normal(zeros, 1.0).to_event(d.event_dims)
            )
            for t in range(self.num_steps, 0, -1):
                observed = obs if t == 1 else None
                x_t = pyro.sample(site_name(t - 1, f"{name}/"), self.step_distribution(x_t, t), obs=observed)
        return x_t

    def chain_from_noise(self, noise: dict[int, torch.Tensor]) -> torch.Tensor:
        r"""x_0 from standardized noises ``{t: z_t}`` (t = T..0, the non-centred form of the
        chain): x_T = z_T, x_{t-1} = μ_θ(x_t, t) + σ_t z_{t-1}.  Shapes ``(*batch, *event_shape)``.
        (For a discretized decoder this is its continuous relaxation.)"""
        x_t = noise[self.num_steps]
        with frozen(self.diffusion):
            for t in range(self.num_steps, 0, -1):
                loc, log_var = reverse_step(self.diffusion, x_t, t)
                x_t = loc + torch.exp(0.5 * log_var) * noise[t - 1]
        return x_t
