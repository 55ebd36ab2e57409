"""Soup methods: how one chunk of every input is combined into the soup's chunk, one function each.

`soup.method` picks one from METHODS (the recipe offers its keys, and lists each method's first
docstring line in `recipe --keys`; `merge_info.json` records it as the formula). A method gets
the inputs' chunks of one key (flat fp32 arrays, converted exactly from the stored dtype, in
input order [base, *checkpoints], each valid until the next is drawn: a method that needs them
all at once copies them), their weights, and a worker's scratch, and returns an fp32 array
(usually `ws.acc`, where the first chunk may already be: that saves a copy). The elements of
every input's chunk come in the same order, not necessarily the stored one (bf16 is
de-interleaved, see numerics.to_fp32): a method is elementwise. The pipeline rounds the result
once to `soup.dtype`.

A new method is a function here and a row of METHODS. soup/config.py reads METHODS when the recipe
loads, so numpy is imported inside the methods (the soup command sets OPENBLAS_NUM_THREADS before
numpy's first import, after the recipe is loaded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from openseek_cpt.errors import UserError

if TYPE_CHECKING:
    import numpy as np


class Scratch(Protocol):
    """A worker's reused fp32 buffers (numerics.Workspace); each call returns a view of n elements."""

    def acc(self, n: int) -> np.ndarray: ...

    def tmp(self, n: int) -> np.ndarray: ...


Method = Callable[[Iterator["np.ndarray"], Sequence[float], Scratch], "np.ndarray"]


def linear(chunks: Iterator[np.ndarray], weights: Sequence[float], ws: Scratch) -> np.ndarray:
    """sum_i(w_i * x_i) / sum_i(w_i), accumulated in float32 in input order.

    Holds one chunk at a time. With uniform weights every w_i is 1, so the result is exactly the
    fp32 sum divided by n.
    """
    import numpy as np

    a = None
    for x, w in zip(chunks, weights, strict=True):
        if w != 1.0:
            x = np.multiply(x, np.float32(w), out=ws.tmp(x.size))
        if a is None:
            a = ws.acc(x.size)
            if not np.may_share_memory(a, x):
                np.copyto(a, x)
        else:
            np.add(a, x, out=a)
    if a is None:
        raise ValueError("linear: no chunk to combine")
    total = sum(weights)
    if total != 1.0:
        np.divide(a, np.float32(total), out=a)
    return a


METHODS: dict[str, Method] = {"linear": linear}


def summary(method: str) -> str:
    """The first line of a method's docstring, without its period: what `recipe --keys` shows."""
    return (METHODS[method].__doc__ or method).strip().splitlines()[0].rstrip(".")


def combine(method: str, chunks: Iterable[np.ndarray], weights: Sequence[float], ws: Scratch) -> np.ndarray:
    """The fp32 combination of one chunk of every input: the one seam between I/O and arithmetic."""
    if method not in METHODS:
        raise UserError(f"soup: method {method!r} is not one of {', '.join(METHODS)}")
    return METHODS[method](iter(chunks), list(weights), ws)
