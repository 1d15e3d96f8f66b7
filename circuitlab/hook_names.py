"""A model's hook points by name: what a user's name, glob, list or predicate means.

``HookedModel.resolve`` / ``point`` / ``hook_table`` answer from a ``PointTable``; unknown
names get close-match suggestions, globs that match nothing say so.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Sequence, Union

import pandas as pd

from .errors import CircuitlabError, did_you_mean
from .hook_points import HookPoint

Names = Union[None, str, Sequence[str], Callable[[str], bool]]


class PointTable:
    """Hook points of one model (``model`` names it in messages), in forward order."""

    def __init__(self, points: Sequence[HookPoint], model: str):
        self.points = {p.name: p for p in points}
        self.model = model

    def point(self, name: str) -> HookPoint:
        """The hook point with exactly this name."""
        if not isinstance(name, str) or name not in self.points:
            raise CircuitlabError(f"{self.model} has no hook point {name!r}."
                                  f"{did_you_mean(str(name), self.points)} `circuitlab layers "
                                  f"--model ...` lists them all")
        return self.points[name]

    def resolve(self, names: Names = None) -> list[HookPoint]:
        """Hook points for a name, a glob, a list of them or a predicate, in forward order.

        Without a pattern: every module output plus the aliases (``*.hook_in`` inputs and later
        calls ``@k`` are listed only when asked for by name or glob).
        """
        points = self.points
        if names is None:
            chosen = [p for p in points.values()
                      if p.alias_of is not None or (p.io == "output" and p.call == 0)]
        elif callable(names):
            chosen = [p for p in points.values() if names(p.name)]
        else:
            wanted = [names] if isinstance(names, str) else list(names)
            chosen = [points[n] for n in dict.fromkeys(n for w in wanted for n in self._names(w))]
        return sorted(chosen, key=lambda p: (p.order, p.name))

    def _names(self, wanted) -> list[str]:
        if not isinstance(wanted, str):
            raise CircuitlabError(f"hook names must be strings, got {wanted!r}")
        if wanted in self.points:
            return [wanted]
        if not any(c in wanted for c in "*?["):
            self.point(wanted)  # raises with close-match suggestions
        hits = [n for n in self.points if fnmatch.fnmatchcase(n, wanted)]
        if not hits:
            raise CircuitlabError(f"no hook point of {self.model} matches {wanted!r}; "
                                  f"`circuitlab layers --model ...` lists them")
        return hits

    def table(self, names: Names = None) -> pd.DataFrame:
        """Hook names with kind, output shape (batch 1, default input size) and unit count."""
        rows = self.resolve(names)
        return pd.DataFrame({
            "name": pd.Series([p.name for p in rows], dtype="string"),
            "kind": pd.Categorical([p.kind for p in rows]),
            "shape": pd.Series(["x".join(map(str, p.shape)) for p in rows], dtype="string"),
            "units": pd.array([p.n_units for p in rows], dtype="Int64"),
            "unit_axis": pd.array([p.unit_axis for p in rows], dtype="Int64"),
            "module": pd.Series([p.module for p in rows], dtype="string"),
            "io": pd.Categorical([p.io for p in rows]),
            "alias_of": pd.Series([p.alias_of for p in rows], dtype="string"),
        })
