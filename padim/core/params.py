"""scikit-learn's estimator protocol for ``PaDiM``: ``get_params``, ``set_params`` (so that
``sklearn.base.clone`` works) and a repr of the parameters that differ from their defaults.

Written out rather than inheriting ``sklearn.base.BaseEstimator``: the same protocol, without adding
scikit-learn's 2 s import to every ``import padim``.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List


class Parameters:
    """The constructor's arguments are the parameters: ``__init__`` only stores them."""

    @classmethod
    def _param_names(cls) -> List[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self, deep: bool = True) -> Dict[str, Any]:
        """The constructor's parameters as set (scikit-learn's protocol; ``deep`` has nothing to recurse)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> "Parameters":
        """Sets constructor parameters; they take effect at the next ``fit``."""
        unknown = sorted(set(params) - set(self._param_names()))
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} parameter(s) {', '.join(unknown)}; valid: {', '.join(self._param_names())}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = [f"{name}={value!r}" for name, value in self.get_params().items() if value != defaults.get(name)]
        return f"{type(self).__name__}({', '.join(changed)})"
