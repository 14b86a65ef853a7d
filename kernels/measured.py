"""Per-shape backend choice from kernel measurements committed with the package.

``kernels/measured.json`` maps a GPU's name to, per op, the fastest implementation measured at
each shape, keyed ``{width: {tokens: name}}`` (width: head dim, embedding width or patch-vector
length; tokens: the sequence, visible or patch count). ``benchmarks/kernels.py --choices``
writes this device's entry from a benchmark run. A call at an unmeasured shape takes the
nearest measured width, then the nearest measured token count.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources

from torch import Tensor

TABLE = "measured.json"


def measured_table(device_name: str) -> dict | None:
    """This GPU's entry of the committed table (``None``: never measured)."""
    table = json.loads(resources.files("symmim.kernels").joinpath(TABLE).read_text())
    return table.get(device_name)


def nearest(choices: dict[str, dict[str, str]], width: int, tokens: int) -> str:
    """The measured winner at the nearest width, then the nearest token count."""
    w = min(choices, key=lambda k: (abs(int(k) - width), int(k)))
    row = choices[w]
    return row[min(row, key=lambda k: (abs(int(k) - tokens), int(k)))]


class ByShape:
    """An op that runs, per call shape, the implementation measured fastest there.

    ``shape_of(*args)`` gives the call's ``(width, tokens)``; ``impls`` maps the table's names to
    functions of one signature. The choice is cached per shape (one dict lookup per call).
    """

    def __init__(self, op: str, choices: dict[str, dict[str, str]], impls: dict[str, Callable[..., Tensor]],
                 shape_of: Callable[..., tuple[int, int]], override: Callable[[int, int], str | None] = lambda w, n: None):
        unknown = {name for row in choices.values() for name in row.values()} - set(impls)
        if unknown:
            raise ValueError(f"kernels/{TABLE}: {op} names {sorted(unknown)}, not among {sorted(impls)}")
        self.op, self.choices, self.impls, self.shape_of, self.override = op, choices, impls, shape_of, override
        self._cache: dict[tuple[int, int], Callable[..., Tensor]] = {}

    def choose(self, width: int, tokens: int) -> str:
        """The implementation's name at ``(width, tokens)``."""
        return self.override(width, tokens) or nearest(self.choices, width, tokens)

    def __call__(self, *args, **kwargs) -> Tensor:
        shape = self.shape_of(*args)
        fn = self._cache.get(shape)
        if fn is None:
            fn = self._cache[shape] = self.impls[self.choose(*shape)]
        return fn(*args, **kwargs)
