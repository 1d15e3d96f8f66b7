"""Renamed keywords, accepted for one release with a DeprecationWarning (pandas'
``deprecate_kwarg`` idea): ``@renamed(method="ablation")``."""
from __future__ import annotations

import functools
import warnings

from .errors import CircuitlabError


def rename(where: str, kwargs: dict, names: dict, stacklevel: int = 3) -> dict:
    """``kwargs`` with each old keyword of ``names`` (old -> new) moved to its new name."""
    for old, new in names.items():
        if old in kwargs:
            if new in kwargs:
                raise CircuitlabError(f"{where}: pass {new}= only ({old}= is its old name)")
            warnings.warn(f"{where}({old}=...) is now {new}=...; the old name goes in the next "
                          f"release", DeprecationWarning, stacklevel=stacklevel)
            kwargs[new] = kwargs.pop(old)
    return kwargs


def renamed(**names: str):
    """Let a function (or a class's ``__init__``) take its old keyword names for a release."""
    def wrap(fn):
        where = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            return fn(*args, **rename(where, kwargs, names))
        return inner
    return wrap
