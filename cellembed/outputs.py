"""Writing results all-or-nothing: every file goes to a temporary name beside its target and
is renamed into place only once complete, so an error or Ctrl-C never leaves half a file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import matplotlib.pyplot as plt


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def prepare_dir(path, what="--figures-dir"):
    """Create the output folder ``path`` (and parents); a clear error if it cannot be one.

    Raises
    ------
    NotADirectoryError
        ``path`` or a parent is a file, or the folder cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file, not a folder; pass another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NotADirectoryError(f"{what} {path} cannot be created ({exc.strerror}); pass another path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise NotADirectoryError(f"{what} {path} is not writable; pass another path")
    return path


def save_figure(fig, path, png_twin=True):
    """Save ``fig`` to ``path`` (format from its suffix) and a ``.png`` twin, then close it.

    The PNG at 150 dpi; vector formats keep the figure's dpi for what they embed as images
    (EPS stores images uncompressed: a higher dpi multiplies their size).
    """
    path = Path(path)
    targets = [path]
    if png_twin and path.suffix.lower() != ".png":
        targets.append(path.with_suffix(".png"))
    try:
        for target in targets:
            fmt = target.suffix.lstrip(".").lower()
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format=fmt, dpi=150 if fmt == "png" else None, bbox_inches="tight")
    finally:
        plt.close(fig)
    return targets


def write_csv(df, path):
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_h5ad(adata, path):
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
