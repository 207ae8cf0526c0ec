"""The errors a user can cause. Every CLI prints them as one line (`error: …`) and exits with code 2."""

from __future__ import annotations


class ReportedError(Exception):
    """An error whose message is complete for a user: the CLIs print it as one line and exit non-zero."""


class InputError(ReportedError, ValueError):
    """A user-caused problem (path, image, prompt, value, checkpoint); the message names the bad value."""
