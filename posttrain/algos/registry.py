"""Name -> function registries for the maths in algos/, one per kind, one shared signature per kind.

Kinds and their signatures (a trainer dispatches with one line, e.g.
``ADVANTAGES.get(name)(rewards, group_size, args)``; the default is an entry like any other):

- ``ADVANTAGES`` (kind ``"advantage"``):
  ``fn(rewards: Tensor[B], group_size: int, args) -> Tensor[B]``. Rewards of one prompt's group sit
  contiguously (rows ``g*G .. g*G+G-1``), as TRL lays them out; NaN marks an unscorable completion.
- ``TOKEN_WEIGHTS`` (kind ``"token_weight"``):
  ``fn(advantages: Tensor[B] | Tensor[B, T], ctx: TokenContext, args) -> Tensor[B, T]``: per-token
  advantages (reweighted or reshaped, detached, 0 on padding) to feed TRL's clipped token loss.
- ``ENTROPY_TERMS`` (kind ``"entropy_term"``):
  ``fn(entropy: Tensor[B, T], ctx: EntropyContext, args) -> (term: Tensor[], diagnostics: dict)``:
  a scalar added to the policy loss, differentiable through ``entropy``.
- ``AGGREGATES`` (kind ``"ensemble_aggregate"``):
  ``fn(scores: Tensor[K, N], args) -> Tensor[N]``: one score per sample from the K reward-model members.

``args`` is the method's small argument dataclass (registered alongside the function so a recipe can
build it by name), never the trainer config. A function may also register ``diagnostics``, called with the
same arguments and returning ``{name: float}`` for the trainer to log as ``<component>/<name>`` (e.g. BNPO's
fitted alpha and beta), so trainers log any component's quantities without knowing which one runs.
Registration happens when ``posttrain.algos`` is imported.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from torch import Tensor

if TYPE_CHECKING:
    from posttrain.algos.entropy_terms import EntropyContext
    from posttrain.algos.token_weights import TokenContext

F = TypeVar("F", bound=Callable[..., Any])

AdvantageFn = Callable[[Tensor, int, Any], Tensor]
TokenWeightFn = Callable[[Tensor, "TokenContext", Any], Tensor]
EntropyTermFn = Callable[[Tensor, "EntropyContext", Any], "tuple[Tensor, dict[str, Tensor]]"]
AggregateFn = Callable[[Tensor, Any], Tensor]


class Registry(Generic[F]):
    """A tiny name -> function map for one kind of formula.

    ``register(name, args=ArgsClass)`` is a decorator; ``get(name)`` returns the function or raises a
    KeyError that lists the closest registered names; ``args_class(name)`` returns the argument
    dataclass registered with it (``None`` when the function takes no arguments); ``names()`` is sorted.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}
        self._args: dict[str, type | None] = {}
        self._diagnostics: dict[str, Callable[..., dict[str, float]] | None] = {}

    def register(self, name: str, *, args: type | None = None,
                 diagnostics: Callable[..., dict[str, float]] | None = None) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name``; a duplicate name is an error."""
        if not name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}")

        def decorator(fn: F) -> F:
            if name in self._fns and self._fns[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            self._args[name] = args
            self._diagnostics[name] = diagnostics
            return fn

        return decorator

    def get(self, name: str) -> F:
        """The function registered as ``name``; KeyError with close matches otherwise."""
        try:
            return self._fns[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._fns), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})") from None

    def args_class(self, name: str) -> type | None:
        """The argument dataclass registered with ``name`` (``None``: the function ignores ``args``)."""
        self.get(name)
        return self._args[name]

    def diagnostics(self, name: str) -> Callable[..., dict[str, float]] | None:
        """The diagnostics function registered with ``name`` (``None``: nothing to log)."""
        self.get(name)
        return self._diagnostics[name]

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __len__(self) -> int:
        return len(self._fns)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


ADVANTAGES: Registry[AdvantageFn] = Registry("advantage")
TOKEN_WEIGHTS: Registry[TokenWeightFn] = Registry("token_weight")
ENTROPY_TERMS: Registry[EntropyTermFn] = Registry("entropy_term")
AGGREGATES: Registry[AggregateFn] = Registry("ensemble_aggregate")
