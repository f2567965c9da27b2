"""The losses `config.dpo.loss` can name: a decorator on the function, its keyword-only parameters its config.

  @register("my_loss")                       # config.dpo.loss = "my_loss"
  def my_loss(x: PairLogps, *, beta: float = 0.1): ...   # config.dpo.beta, default 0.1

  loss = LOSSES["my_loss"](beta=0.5)         # a Loss: x -> (loss, metrics), with its flags
  loss = from_config(config.dpo)             # the same, its hyper-parameters read from config.dpo
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Registered:
  """A loss function `config.dpo.loss` can name; calling it with hyper-parameters gives the `Loss` a step takes."""

  name: str
  fn: Callable
  reference_free: bool = False  # no reference log-probs are computed
  unpaired: bool = False  # takes UnpairedLogps (data.input_format=unpaired)

  def defaults(self) -> dict[str, Any]:
    """{hyper-parameter: default}: the function's keyword-only parameters."""
    return {p.name: p.default for p in inspect.signature(self.fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}

  def __call__(self, **hyper) -> "Loss":
    unknown = sorted(set(hyper) - set(self.defaults()))
    if unknown:
      raise TypeError(f"loss {self.name!r} has no hyper-parameter {unknown[0]!r}; it takes {sorted(self.defaults())}")
    return Loss(self, tuple({**self.defaults(), **hyper}.items()))


@dataclasses.dataclass(frozen=True)
class Loss:
  """A registered loss with its hyper-parameters bound: x -> (loss, metrics)."""

  registered: Registered
  hyper: tuple[tuple[str, Any], ...]

  def __call__(self, x):
    return self.registered.fn(x, **dict(self.hyper))

  @property
  def name(self) -> str:
    return self.registered.name

  @property
  def reference_free(self) -> bool:
    return self.registered.reference_free

  @property
  def unpaired(self) -> bool:
    return self.registered.unpaired


LOSSES: dict[str, Registered] = {}


def register(name: str, *, reference_free: bool = False, unpaired: bool = False):
  """Decorator: the loss function `config.dpo.loss=name` selects (the function itself is unchanged); a
  reference-free loss gets no reference log-probs, an unpaired one takes UnpairedLogps."""

  def add(fn):
    LOSSES[name] = Registered(name, fn, reference_free, unpaired)
    return fn

  return add


def from_config(cfg, **hyper) -> Loss:
  """The registered loss `cfg.loss` with its hyper-parameters read from `cfg` (config.dpo), those in `hyper`
  replaced (values that may be traced: one per member of a sweep, rlhfx.members)."""
  registered = LOSSES[cfg.loss]
  return registered(**{k: hyper.get(k, cfg[k]) for k in registered.defaults()})


def config_fields() -> dict[str, object]:
  """{field: default} over every registered loss (a field two losses share takes the first one's default)."""
  out: dict[str, object] = {}
  for registered in LOSSES.values():
    for k, default in registered.defaults().items():
      out.setdefault(k, default)
  return out
