"""One torch optimizer for every parameter ``SVI`` hands it: :class:`FusedOptim`, :class:`FusedAdam`.

``pyro.optim.Adam`` (any :class:`pyro.optim.PyroOptim`) keeps one ``torch.optim.Adam`` *per
parameter tensor* and steps them one by one from Python; for a network of a few dozen tensors
that loop costs about as much again as the update itself (``docs/benchmarks.md``).
:class:`FusedOptim` keeps a single torch optimizer over all of them, so a step is one call into
torch.  The update of each parameter is the same: Adam (like SGD, RMSprop, …) is elementwise, so
stepping the tensors together or one at a time computes the same numbers.

"Fused" here means *one optimizer*; it is not torch's ``fused=True`` kernel, which can be asked
for through ``optim_args`` (``{"lr": 1e-3, "fused": True}``) like any other argument of the
torch optimizer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import pyro
import pyro.optim
import torch
from pyro.optim.optim import _load_state_dict

__all__ = ["FusedOptim", "FusedAdam"]


def _snapshot(state: dict) -> dict:
    """A copy of one parameter's optimizer state (tensors cloned)."""
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _group_key(hyper: dict) -> str:
    # repr is exact for floats, bools, tuples and None, the values torch optimizers keep
    return repr(sorted(hyper.items()))


class FusedOptim(pyro.optim.PyroOptim):
    """A :class:`pyro.optim.PyroOptim` that keeps **one** torch optimizer over every parameter.

    Each call (``SVI.step`` calls it with the parameters its trace found) steps all of them
    with a single ``optimizer.step()``.  Parameters never seen before join the optimizer as a
    new param group (ordered by their name in Pyro's param store, so runs are reproducible),
    with ``optim_args`` — or, when ``optim_args`` is a callable, with what it returns for that
    parameter's name, as in ``PyroOptim``.  Parameters the optimizer knows but that are not in
    the call are left alone, as ``PyroOptim`` leaves them (their gradients are hidden from the
    step, so Adam's moments and step count do not move either).

    Computes the same update as ``PyroOptim(optim_constructor, optim_args)`` (e.g.
    ``pyro.optim.Adam``): one optimizer over many tensors applies the same elementwise rule to
    each; what changes is the number of Python-level optimizer calls and, where torch uses
    ``foreach``/``fused`` kernels, the number of kernel launches.

    Args:
        optim_constructor: a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.Adam``.
        optim_args: the optimizer's keyword arguments (``{"lr": 1e-3}``), or a callable taking a
            parameter's name (``PyroOptim``'s convention) and returning them.  A dict is checked
            at once by building a throwaway optimizer.
        clip_norm: if given, before each step the gradients of the call's parameters are
            rescaled so that their *total* 2-norm is at most ``clip_norm``
            (``torch.nn.utils.clip_grad_norm_`` over all of them).  Not ``ClippedAdam``'s
            ``clip_norm``, which clamps each gradient element.
        lrd: learning-rate decay: every param group's ``lr`` is multiplied by ``lrd`` before
            each step, as ``pyro.optim.ClippedAdam`` does (so after n steps it is
            ``lr · lrd**n``).  Default 1 (no decay).
        set_grads_to_none: after the step, set the stepped parameters' ``.grad`` to ``None``
            (default), as ``Optimizer.zero_grad()`` does by default.  ``SVI`` then skips them in
            its ``zero_grads`` (which would allocate a zero tensor per parameter) and the next
            backward pass writes the gradients instead of adding them to zeros — the same
            numbers, fewer kernels.  ``False`` leaves the gradients for ``SVI`` to zero, as
            with ``pyro.optim.Adam``.

    State: :meth:`get_state` returns ``{param name: state dict}`` in the same per-parameter
    format ``PyroOptim.get_state`` writes (each entry is what a one-parameter torch optimizer's
    ``state_dict()`` holds), so checkpoints are interchangeable with ``pyro.optim.Adam``'s.
    :meth:`set_state` restores it — for parameters not seen yet, when they appear (as
    ``PyroOptim`` does, so it can be called before the first step, as
    ``pyro_diffusion.training`` does on resume); for parameters already known, at once.
    :meth:`save` / :meth:`load` write and read it with ``torch.save`` / ``torch.load``.
    """

    def __init__(
        self,
        optim_constructor: type[torch.optim.Optimizer],
        optim_args: dict | Callable[..., dict],
        *,
        clip_norm: float | None = None,
        lrd: float = 1.0,
        set_grads_to_none: bool = True,
    ) -> None:
        if not (inspect.isclass(optim_constructor) and issubclass(optim_constructor, torch.optim.Optimizer)):
            raise TypeError(
                "optim_constructor: expected a torch.optim.Optimizer subclass such as "
                f"torch.optim.Adam, got {optim_constructor!r:.80}"
            )
        if isinstance(optim_args, dict):
            _check_args(optim_constructor, optim_args, "optim_args")
        elif not callable(optim_args):
            raise TypeError(
                "optim_args: expected a dict of the optimizer's arguments or a callable returning "
                f"one per parameter name, got {type(optim_args).__name__}"
            )
        if clip_norm is not None and not (_is_real(clip_norm) and 0 < clip_norm < math.inf):
            raise ValueError(f"clip_norm: expected a positive finite number or None, got {clip_norm!r}")
        if not (_is_real(lrd) and 0 < lrd < math.inf):
            raise ValueError(f"lrd: expected a positive finite number (1 = no decay), got {lrd!r}")
        if not isinstance(set_grads_to_none, bool):
            raise TypeError(f"set_grads_to_none: expected a bool, got {set_grads_to_none!r}")
        super().__init__(optim_constructor, optim_args)
        self.set_grads_to_none = set_grads_to_none
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.lrd = float(lrd)
        self._optimizer: torch.optim.Optimizer | None = None
        self._known: set[torch.Tensor] = set()  # every parameter the optimizer holds
        self._ordered: list[torch.Tensor] = []  # the same, in optimizer order

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer (``None`` until the first step), e.g. to read its ``lr``."""
        return self._optimizer

    # ------------------------------------------------------------------ the step
    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        """One optimizer step over ``params`` (extra arguments go to ``optimizer.step``)."""
        if not isinstance(params, (set, frozenset)):
            params = set(params)
        new = [p for p in params if p not in self._known]
        if new:
            self._add(new, {})
        optimizer = self._optimizer
        if optimizer is None:  # no parameters at all
            return
        if self.lrd != 1.0:
            for group in optimizer.param_groups:
                lr = group["lr"]
                if torch.is_tensor(lr):
                    lr.mul_(self.lrd)
                else:
                    group["lr"] = lr * self.lrd
        if len(params) == len(self._known):  # the usual case: the call covers every parameter
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._ordered, self.clip_norm)
            optimizer.step(*args, **kwargs)
            if self.set_grads_to_none:
                for p in self._ordered:
                    p.grad = None
            return
        # a subset: hide the other parameters' gradients (optimizers skip grad None)
        hidden = [(p, p.grad) for p in self._ordered if p not in params and p.grad is not None]
        try:
            for p, _ in hidden:
                p.grad = None
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in self._ordered if p in params], self.clip_norm)
            optimizer.step(*args, **kwargs)
        finally:
            for p, grad in hidden:
                p.grad = grad
        if self.set_grads_to_none:
            for p in params:
                p.grad = None

    def _args_for(self, param: torch.Tensor) -> dict:
        if not callable(self.pt_optim_args):
            return self.pt_optim_args
        try:
            args = self._get_optim_args(param)
        except AssertionError as error:  # PyroOptim asserts the callable returned a dict
            raise TypeError(f"optim_args: the callable must return a dict of arguments ({error})") from None
        _check_args(self.pt_optim_constructor, args, "optim_args(name)")
        return args

    def _add(self, new: list[torch.Tensor], restored: dict) -> None:
        """Put ``new`` parameters into the optimizer: one param group per distinct set of
        hyperparameters, with saved state (``restored`` by parameter, else waiting by name)
        loaded the way ``PyroOptim`` loads it (through a one-parameter optimizer)."""
        store = pyro.get_param_store()
        names = {p: store.param_name(p) for p in new}
        new = sorted(new, key=lambda p: (names[p] is None, names[p] or ""))
        groups: dict[str, dict] = {}
        states: dict[torch.Tensor, dict] = {}
        for p in new:
            args = self._args_for(p)
            saved = restored.get(p)
            if saved is None and names[p] is not None:
                saved = self._state_waiting_to_be_consumed.pop(names[p], None)
            if saved is None:
                hyper = {k: v for k, v in args.items() if k != "params"}
            else:
                single = self.pt_optim_constructor([p], **args)
                try:
                    _load_state_dict(single, saved)
                except (KeyError, ValueError, TypeError, IndexError) as error:
                    raise ValueError(
                        f"set_state: the saved state of {names[p]!r} does not fit a "
                        f"{self.pt_optim_constructor.__name__} over that parameter ({error})"
                    ) from error
                hyper = {k: v for k, v in single.param_groups[0].items() if k != "params"}
                if single.state.get(p):
                    states[p] = single.state[p]
            group = groups.setdefault(_group_key(hyper), {"hyper": hyper, "args": args, "params": []})
            group["params"].append(p)
        for group in groups.values():
            entry = {"params": group["params"], **group["hyper"]}
            if self._optimizer is None:
                self._optimizer = self.pt_optim_constructor([entry], **group["args"])
            else:
                self._optimizer.add_param_group(entry)
            self._ordered.extend(group["params"])
            self._known.update(group["params"])
        for p, state in states.items():
            self._optimizer.state[p] = state

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict:
        """``{param name: one-parameter optimizer state dict}`` — a snapshot (tensors copied),
        including saved state not yet claimed by a parameter.  Raises if a parameter the
        optimizer holds is not in Pyro's param store (its state could not be named)."""
        state = dict(self._state_waiting_to_be_consumed)
        if self._optimizer is None:
            return state
        store = pyro.get_param_store()
        for group in self._optimizer.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                name = store.param_name(p)
                if name is None:
                    raise RuntimeError(
                        "get_state: the optimizer holds a parameter that is not in Pyro's param "
                        f"store (shape {tuple(p.shape)}), so its state cannot be named"
                    )
                own = self._optimizer.state.get(p)
                state[name] = {
                    "state": {0: _snapshot(own)} if own else {},
                    "param_groups": [{**hyper, "params": [0]}],
                }
        return state

    def set_state(self, state_dict: dict) -> None:
        """Restore :meth:`get_state`'s (or ``PyroOptim.get_state``'s) output."""
        if not isinstance(state_dict, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in state_dict.items()
        ):
            raise TypeError(
                "set_state: expected {param name: optimizer state dict} as get_state() returns, "
                f"got {type(state_dict).__name__}"
            )
        self._state_waiting_to_be_consumed.update(state_dict)
        if self._optimizer is None:
            return
        store = pyro.get_param_store()
        if not any(store.param_name(p) in state_dict for p in self._ordered):
            return
        # some known parameters get new state: rebuild the optimizer, keeping the others' state
        params, old = self._ordered, self._optimizer
        restored = {}
        for group in old.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                if store.param_name(p) not in state_dict:
                    own = old.state.get(p)
                    restored[p] = {
                        "state": {0: own} if own else {},
                        "param_groups": [{**hyper, "params": [0]}],
                    }
        self._optimizer, self._known, self._ordered = None, set(), []
        self._add(params, restored)


def FusedAdam(
    optim_args: dict | Callable[..., dict],
    *,
    clip_norm: float | None = None,
    lrd: float = 1.0,
    set_grads_to_none: bool = True,
) -> FusedOptim:
    """``torch.optim.Adam`` over all parameters in one optimizer: the same updates as
    ``pyro.optim.Adam(optim_args)`` at a fraction of its per-step cost.  ``clip_norm``
    (total gradient norm), ``lrd`` (learning-rate decay per step) and ``set_grads_to_none``
    as in :class:`FusedOptim`."""
    return FusedOptim(
        torch.optim.Adam, optim_args, clip_norm=clip_norm, lrd=lrd, set_grads_to_none=set_grads_to_none
    )


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_args(constructor: type[torch.optim.Optimizer], args: Any, what: str) -> None:
    """Build a throwaway optimizer with ``args`` so that bad ones fail now, by name."""
    if not isinstance(args, dict):
        raise TypeError(
            f"{what}: expected a dict of {constructor.__name__}'s arguments, got {type(args).__name__}"
        )
    for key in ("lrd", "clip_norm"):
        if key in args and key not in inspect.signature(constructor).parameters:
            raise ValueError(
                f"{what}: {key!r} is not an argument of {constructor.__name__}; pass it as "
                f"FusedOptim(..., {key}=...) (note: clip_norm there clips the total gradient norm, "
                "not each element as ClippedAdam's does)"
            )
    if "params" in args:
        raise ValueError(f"{what}: must not contain 'params' (the parameters come from SVI)")
    try:
        constructor([torch.zeros(1, requires_grad=True)], **args)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{what}: {constructor.__name__} refuses {args!r}: {error}") from None
