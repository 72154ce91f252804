r"""The trained reverse chain as a prior inside a user's Pyro model.

:class:`DiffusionPrior` samples the reverse chain of any
:class:`~pyro_diffusion.diffusion.Diffusion` on a grid of K noise levels γ_1 < … < γ_K
(the model's own grid, or a sub-grid of it: ``num_steps``)

.. math::

    x_K \sim \mathcal N(0, I),\qquad x_{k-1} \sim p_θ(x_{k-1} \mid x_k)\ (k = K..2),\qquad
    x_0 \sim p_θ(x_0 \mid x_1)

as Pyro sites ``{name}/x_K … {name}/x_1, {name}/x_0`` and returns x_0, so that
``x = prior("image")`` can stand wherever a user's model would write
``x = pyro.sample("image", SomePrior)``.  The steps are the model's reverse steps
``diffusion.reverse_step(x_k, γ_{k−1}, γ_k)`` and the last one its decoder
``diffusion.decoder_distribution(x_1, γ_1)``, so a DDPM, a respaced DDPM and a
continuous-time model with a learned schedule are all used the same way.  Three properties
make it composable:

* **Scoped sites.** Every site carries the caller's ``name`` as a prefix, so two uses (two
  images, or a prior inside a plate and another outside) never collide.
* **Frozen parameters by default.** The diffusion (denoiser, schedule, decoder) runs with its
  parameters' ``requires_grad`` switched off for the duration of the call and is never
  entered into Pyro's param store (no ``pyro.module``), so a user's SVI neither trains nor
  overwrites it: gradients flow to the x_k (as samplers need) but not to the weights.
  ``fine_tune=True`` registers the diffusion under ``module_name`` instead, and then the
  user's optimizer trains it (a learned schedule included).
* **Batch shapes from the user's plates.** No plate of its own: the first site has batch
  shape ``()`` and Pyro's plates broadcast it, so inside ``pyro.plate("images", n)`` the prior
  draws n independent x_0 of shape ``(n, *event_shape)``; nested plates and vectorized
  particles (``num_particles`` with ``vectorize_particles=True``, ``Predictive(parallel=True)``)
  work alike.  The denoiser sees the leading dimensions flattened into one batch.

For data with a discretized decoder, ``decoder="gaussian"`` replaces the last step by its
continuous relaxation (the Gaussian with the decoder's location and scale) so that x_0 is a
continuous latent (needed by NUTS, SVI with reparameterized guides, and gradient-based
samplers).

**Non-centring.** NUTS mixes far better on the chain's standardized noises than on the x_k
themselves.  ``poutine.reparam(model, config=prior.reparam_config("x"))`` applies Pyro's
:class:`~pyro.infer.reparam.LocScaleReparam` (``centered=0``) to the sites ``x/x_K … x/x_0``
only; each becomes a deterministic function of a new standard-normal site
``x/x_k_decentered``.  A ``config`` *callable* that also answers the new
``…_decentered`` sites would reparameterize them again, and again, without end: the prior
refuses that with a ValueError naming the site instead of letting Pyro recurse.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.reparam import LocScaleReparam
from pyro.poutine.messenger import Messenger

from ..chains import site_name
from ..decoders import DiscretizedGaussian
from ..diffusion import Diffusion
from ..schedules import check_num_steps

__all__ = ["DiffusionPrior", "frozen", "check_diffusion", "inference_grid", "relaxed", "DECENTERED"]

#: the suffix Pyro's :class:`~pyro.infer.reparam.LocScaleReparam` gives the standardized site
DECENTERED = "_decentered"


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


def check_diffusion(diffusion, argument: str = "diffusion") -> Diffusion:
    """Refuse anything but a :class:`~pyro_diffusion.diffusion.Diffusion`."""
    if not isinstance(diffusion, Diffusion):
        raise TypeError(
            f"{argument}: expected a Diffusion (e.g. GaussianDiffusion(...) or Diffusion(denoiser, "
            f"schedule, event_shape)), got {type(diffusion).__name__}"
        )
    return diffusion


def _check_grid_size(num_steps) -> int | None:
    if num_steps is None:
        return None
    return check_num_steps(num_steps, "num_steps")


def inference_grid(diffusion: Diffusion, num_steps: int | None = None) -> torch.Tensor:
    """The levels γ_1 < … < γ_K a method runs on: ``diffusion.grid(num_steps)`` (None: the
    model's own grid; K: a K-level grid, respaced for a tabulated schedule), detached, on the
    model's device, float64."""
    with torch.no_grad():
        return diffusion.grid(_check_grid_size(num_steps)).detach().to(torch.float64).to(diffusion.device)


def relaxed(decoder: dist.Distribution) -> dist.Distribution:
    """A discretized decoder's continuous relaxation N(loc, scale²); other decoders as they are."""
    if isinstance(decoder, DiscretizedGaussian):
        return dist.Normal(decoder.loc, decoder.scale)
    return decoder


class _RefuseRepeatedReparam(Messenger):
    """Raises on a site of the prior that is reparameterized a second time (the name carries
    the ``_decentered`` suffix twice): Pyro would otherwise recurse until the stack overflows."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if name.startswith(self.prefix) and name.endswith(2 * DECENTERED):
            raise ValueError(
                f"config: poutine.reparam reparameterized the prior's non-centred site "
                f"{name[: -len(DECENTERED)]!r} again (Pyro would recurse forever); a config callable "
                f"must return None for sites ending in {DECENTERED!r}, e.g. use "
                f"config=prior.reparam_config({self.prefix[:-1]!r})"
            )


class DiffusionPrior:
    r"""A trained :class:`~pyro_diffusion.diffusion.Diffusion` as a prior over x_0 in any Pyro model.

    Args:
        diffusion: the trained diffusion (any schedule, parameterization and decoder).
        num_steps: the chain's grid: None (default) the model's own, K a K-level grid
            (``diffusion.grid(K)``: for a tabulated DDPM schedule a respaced sub-grid of its
            steps; for a schedule that is a function of time, K levels of it).  The sites are
            ``x_K … x_1, x_0`` on that grid.
        fine_tune: register the diffusion's parameters with ``pyro.module(module_name, …)`` so
            that the user's optimizer trains them (default False: frozen, see module docstring).
        module_name: the param-store name used when ``fine_tune`` (default: ``diffusion.name``).
        decoder: ``"model"`` (default: the diffusion's own decoder) or ``"gaussian"`` (the
            continuous relaxation of a discretized decoder, for gradient-based inference).
        reverse_variance: None (the model's reverse variances) or per-level variances from
            :func:`~pyro_diffusion.inference.variances.analytic_variances` on the same grid:
            every step x_{k−1} | x_k, and the decoder (then always Gaussian), keeps the model's
            mean and takes the estimated variance, the chain whose conditional the samplers
            that take the same argument target.

    Example::

        prior = DiffusionPrior(diffusion, num_steps=50)

        def model(y):
            sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
            with pyro.plate("images", y.shape[0]):
                x = prior("x")                     # sites x/x_50 … x/x_0, shape (n, 1, 8, 8)
                # sigma[..., None, None, None]: a global site against x needs one None per
                # event dimension, or the model does not vectorize (Predictive, az.from_pyro)
                pyro.sample("y", dist.Normal(x, sigma[..., None, None, None]).to_event(3), obs=y)
    """

    def __init__(
        self,
        diffusion: Diffusion,
        *,
        num_steps: int | None = None,
        fine_tune: bool = False,
        module_name: str | None = None,
        decoder: str = "model",
        reverse_variance=None,
    ) -> None:
        from .variances import check_variances

        check_diffusion(diffusion)
        if decoder not in ("model", "gaussian"):
            raise ValueError(f"decoder: expected 'model' or 'gaussian', got {decoder!r}")
        self.diffusion = diffusion
        self.grid_size = _check_grid_size(num_steps)
        self.fine_tune = bool(fine_tune)
        self.module_name = module_name or diffusion.name
        self.decoder = decoder
        grid = inference_grid(diffusion, self.grid_size)  # refuse a grid the schedule cannot give, now
        if reverse_variance is not None and self.fine_tune:
            raise ValueError(
                "reverse_variance: estimated variances belong to a frozen model, not with fine_tune"
            )
        self.reverse_variance = check_variances(diffusion, reverse_variance, grid)

    # ------------------------------------------------------------------ the grid
    @property
    def num_steps(self) -> int:
        """K, the number of noise levels of the chain (the sites are x_K … x_1, x_0)."""
        return self.grid_size if self.grid_size is not None else self.diffusion.num_steps

    def grid(self) -> torch.Tensor:
        """γ_1 < … < γ_K (float64; differentiable for a learned schedule when ``fine_tune``)."""
        if self.fine_tune:
            return self.diffusion.grid(self.grid_size).to(torch.float64)
        return inference_grid(self.diffusion, self.grid_size)

    @property
    def network_calls_per_chain(self) -> int:
        """Denoiser evaluations of one pass down the chain: one per step, and one more for the
        decoder when it uses the network."""
        return self.num_steps - 1 + int(self.diffusion.decoder_uses_network)

    @property
    def event_shape(self) -> torch.Size:
        return self.diffusion.event_shape

    def site_names(self, name: str) -> list[str]:
        """The sites the prior samples under ``name``, in order: x_K … x_1, x_0."""
        return [site_name(k, f"{name}/") for k in range(self.num_steps, -1, -1)]

    def decentered_site_names(self, name: str) -> list[str]:
        """The standardized sites ``{name}/x_K_decentered … {name}/x_0_decentered`` that
        :meth:`reparam_config` creates (what NUTS samples after non-centring)."""
        return [site + DECENTERED for site in self.site_names(name)]

    def reparam_config(self, name: str, centered: float = 0.0) -> dict:
        """A ``poutine.reparam`` config that non-centres the chain sampled under ``name``:
        ``{site: LocScaleReparam(centered)}`` for the sites x_K … x_0 (``centered=0``: fully
        non-centred, x_{k-1} = loc + scale · z with z ~ N(0, I)), and nothing else, so the
        new ``…_decentered`` sites are left alone.  Merge it with the config of the user's
        other sites (``{**prior.reparam_config("x"), "theta": ...}``)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string to scope the sites, got {name!r}")
        if isinstance(centered, bool) or not isinstance(centered, (int, float)) or not 0 <= centered <= 1:
            raise ValueError(f"centered: expected a number in [0, 1], got {centered!r}")
        return {site: LocScaleReparam(centered=float(centered)) for site in self.site_names(name)}

    # ------------------------------------------------------------------ the steps
    def step_distribution(
        self, x_t: torch.Tensor, k: int, grid: torch.Tensor | None = None
    ) -> dist.Distribution:
        """p_θ(x_{k-1} | x_k) with event shape ``event_shape`` (the decoder at k = 1), for x_k
        of any leading shape; ``grid`` defaults to :meth:`grid`."""
        grid = self.grid() if grid is None else grid
        K = grid.shape[0]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K:
            raise ValueError(f"k: expected a level 1..{K} of the grid, got {k!r}")
        d = self.diffusion
        variances = self.reverse_variance
        if k == 1:
            decoder = d.decoder_distribution(x_t, grid[0])
            if self.decoder == "gaussian" or variances is not None:
                decoder = relaxed(decoder)
            if variances is not None:
                decoder = dist.Normal(decoder.loc, variances.scale(1, decoder.loc))
            return decoder.to_event(d.event_dims)
        p, _ = d.reverse_step(x_t, grid[k - 2], grid[k - 1])
        scale = p.scale if variances is None else variances.scale(k, p.loc)
        # a plain Normal (the step's loc and scale): reparameterizations rebuild it by type
        return dist.Normal(p.loc, scale).to_event(d.event_dims)

    def _context(self):
        if self.fine_tune:
            pyro.module(self.module_name, self.diffusion)
            return contextlib.nullcontext()
        return frozen(self.diffusion)

    def __call__(self, name: str, *, obs: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the chain as sites ``{name}/x_K … {name}/x_0`` and return x_0 (observed when
        ``obs`` is given, of shape ``(*batch, *event_shape)``)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string to scope the sites, got {name!r}")
        d = self.diffusion
        dtype = obs.dtype if obs is not None else torch.get_default_dtype()
        if obs is not None:
            event_dims = d.event_dims
            if tuple(obs.shape[obs.dim() - event_dims :]) != tuple(d.event_shape):
                raise ValueError(
                    f"obs: expected trailing shape {tuple(d.event_shape)}, got {tuple(obs.shape)}"
                )
        with self._context(), _RefuseRepeatedReparam(f"{name}/"):
            grid = self.grid()
            K = grid.shape[0]
            zeros = torch.zeros(d.event_shape, dtype=dtype, device=d.device)
            x_t = pyro.sample(site_name(K, f"{name}/"), dist.Normal(zeros, 1.0).to_event(d.event_dims))
            for k in range(K, 0, -1):
                observed = obs if k == 1 else None
                x_t = pyro.sample(
                    site_name(k - 1, f"{name}/"), self.step_distribution(x_t, k, grid), obs=observed
                )
        return x_t

    def chain_from_noise(self, noise: dict[int, torch.Tensor]) -> torch.Tensor:
        r"""x_0 from standardized noises ``{k: z_k}`` (k = K..0, the non-centred form of the
        chain): x_K = z_K, x_{k-1} = loc_k + scale_k z_{k-1} with the step's (or the
        decoder's) location and scale.  Shapes ``(*batch, *event_shape)``.  (For a discretized
        decoder this is its continuous relaxation.)"""
        grid = inference_grid(self.diffusion, self.grid_size)
        K = grid.shape[0]
        missing = [k for k in range(K + 1) if k not in noise]
        if missing:
            raise ValueError(f"noise: expected the keys {K}..0, missing {missing}")
        x_t = noise[K]
        with frozen(self.diffusion):
            for k in range(K, 0, -1):
                step = self.step_distribution(x_t, k, grid).base_dist
                x_t = step.loc + step.scale * noise[k - 1]
        return x_t
