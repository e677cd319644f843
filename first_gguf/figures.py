"""matplotlib for report figures: imported on first use, with a file-only backend."""

from __future__ import annotations

from .errors import FirstError


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed).

    Raises:
        FirstError: matplotlib is not installed (it comes with the ``eval`` extra).
    """
    try:
        import matplotlib
    except ImportError as e:
        raise FirstError("report figures need matplotlib, part of the eval extra: "
                         "pip install 'first-gguf[eval]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
