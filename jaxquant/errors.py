"""Exceptions raised by jaxquant.

Every error a user can cause (a wrong path, a mismatched checkpoint, a bad config
value) is a :class:`JaxquantError` whose message names the problem and, where there is
one, the fix. The CLI prints these without a traceback and exits non-zero.
"""

from __future__ import annotations


class JaxquantError(Exception):
    """Base class of all jaxquant errors a user can act on."""


class ConfigError(JaxquantError):
    """A model or run configuration has an unknown key or an unsupported value."""


class CheckpointError(JaxquantError):
    """A checkpoint is missing, unreadable, or does not match the architecture."""


class DataError(JaxquantError):
    """Input data is missing or malformed."""
