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
build it by name), never the trainer config. Everything else a trainer must know to run a component is declared
with it, so a new component is one registration and the trainer never names a paper (``Entry``):

- ``config``: how ``args`` is read from a trainer config: ``{arg field: config attribute name, or
  callable(config) -> value}`` (``Entry.build_args``).
- ``diagnostics``: called like the function (token weights: with the output appended) and returning
  ``{name: value}`` to log as ``<component>/<name>``; keys ending in ``_min`` / ``_max`` are reduced over
  processes by min / max, the rest by mean.
- ``needs``: context fields the trainer must fill that cost something to get (``entropy_old``: the sampling
  policy's token entropies; ``tempered_old_logps``: its sampled-token log-probs at the temperatures
  ``temperatures(args)`` returns; ``correct``: the shared correctness of each completion and the global
  fraction correct). Cheap fields (mask, logp, ratio, rewards) are always filled.
- ``state``: a cross-step state class (``posttrain.algos.state``) the trainer creates, checkpoints, passes in
  the context (its ``context()`` fields) and updates once per optimizer step with the mean of
  ``state_signal(...) -> (sum, count)`` over the step's micro-batches and all processes.
- ``check``: ``check(rewards, args) -> str | None``, a problem with the batch to warn about once per run (or
  raise from, when ``args`` say so), e.g. rewards outside BNPO's range.
- ``noop``: the component changes nothing (``none``): the trainer skips it entirely, so e.g. TRL's fused
  kernel does not run an entropy-gradient pass for a zero term.
Registration happens when ``posttrain.algos`` is imported.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from torch import Tensor

if TYPE_CHECKING:
    from posttrain.algos.context import EntropyContext, TokenContext

F = TypeVar("F", bound=Callable[..., Any])

AdvantageFn = Callable[[Tensor, int, Any], Tensor]
TokenWeightFn = Callable[[Tensor, "TokenContext", Any], Tensor]
EntropyTermFn = Callable[[Tensor, "EntropyContext", Any], "tuple[Tensor, dict[str, Tensor]]"]
AggregateFn = Callable[[Tensor, Any], Tensor]


ConfigSource = str | Callable[[Any], Any]


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered component: its function and what a trainer needs to know to run it (module docstring)."""

    name: str
    fn: F
    args: type | None = None
    config: Mapping[str, ConfigSource] = field(default_factory=dict)
    diagnostics: Callable[..., dict[str, Any]] | None = None
    needs: frozenset[str] = frozenset()
    temperatures: Callable[[Any], tuple[float, ...]] | None = None
    state: type | None = None
    state_signal: Callable[..., tuple[Tensor, Tensor]] | None = None
    check: Callable[..., str | None] | None = None
    noop: bool = False

    def build_args(self, config: Any) -> Any:
        """The argument dataclass filled from `config` as `self.config` maps it (None when the function takes no
        arguments); the dataclass validates the values."""
        if self.args is None:
            return None
        values = {k: (src(config) if callable(src) else getattr(config, src)) for k, src in self.config.items()}
        return self.args(**values)


class Registry(Generic[F]):
    """A tiny name -> function map for one kind of formula.

    ``register(name, args=ArgsClass, ...)`` is a decorator (keywords: the fields of ``Entry``); ``get(name)``
    returns the function or raises a KeyError that lists the closest registered names; ``entry(name)`` returns
    everything registered with it; ``args_class(name)`` the argument dataclass (``None`` when the function
    takes no arguments); ``names()`` is sorted.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, **declared: Any) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name`` with the declarations of ``Entry``; a duplicate name is an
        error."""
        if not name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if "needs" in declared:
            declared["needs"] = frozenset(declared["needs"])

        def decorator(fn: F) -> F:
            if name in self._entries and self._entries[name].fn is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name=name, fn=fn, **declared)
            return fn

        return decorator

    def entry(self, name: str) -> Entry[F]:
        """Everything registered as ``name``; KeyError with close matches otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})") from None

    def get(self, name: str) -> F:
        """The function registered as ``name``; KeyError with close matches otherwise."""
        return self.entry(name).fn

    def args_class(self, name: str) -> type | None:
        """The argument dataclass registered with ``name`` (``None``: the function ignores ``args``)."""
        return self.entry(name).args

    def diagnostics(self, name: str) -> Callable[..., dict[str, Any]] | None:
        """The diagnostics function registered with ``name`` (``None``: nothing to log)."""
        return self.entry(name).diagnostics

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


ADVANTAGES: Registry[AdvantageFn] = Registry("advantage")
TOKEN_WEIGHTS: Registry[TokenWeightFn] = Registry("token_weight")
ENTROPY_TERMS: Registry[EntropyTermFn] = Registry("entropy_term")
AGGREGATES: Registry[AggregateFn] = Registry("ensemble_aggregate")
