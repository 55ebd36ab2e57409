"""Files the release ships beside the package (recipes/, the Accelerate configs): where to find them.

In a checkout they sit next to the package; in the image the package is installed into
site-packages and the repo's files are under $OPENSEEK_CPT_HOME (set by container/Dockerfile).
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def find_shipped(relative: str | Path) -> Path | None:
    """`relative` (e.g. recipes/tiny/config.yaml) under $OPENSEEK_CPT_HOME or the checkout, or None."""
    for root in (os.environ.get("OPENSEEK_CPT_HOME"), CHECKOUT):
        if root and (path := Path(root) / relative).is_file():
            return path
    return None
