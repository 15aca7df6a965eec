"""Errors a user sees as one line (``error: ...``, exit code 2) instead of a traceback.

Its own module so that commands that only need to raise it (slurm, datasets, sample) do not
import LightningCLI.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or config: reported as one line, without a traceback."""
