"""The omni_ros exception family.

Every error the project raises on purpose is an :class:`OmniError`. Third-party exceptions are
converted where they enter (decoders, backends, servers), so callers catch one family.
"""

from __future__ import annotations


class OmniError(Exception):
    """Base of every error omni_ros raises on purpose."""


class ConfigError(OmniError, ValueError):
    """A parameter or configuration value is invalid; the message names it and says how to fix it."""


class DecodeError(OmniError, ValueError):
    """An input message cannot be decoded (bad encoding, truncated data, wrong size)."""


class AlignmentError(OmniError):
    """Stamped input cannot be placed on the timeline (too late, too far in the future, ...)."""


class StateError(OmniError, RuntimeError):
    """An object was used out of order (e.g. ``generate()`` before ``prefill()``)."""


class BackendError(OmniError):
    """A model backend failed. Subclasses say how."""


class BackendTimeout(BackendError):
    """A backend call did not finish before its deadline."""


class BackendUnavailable(BackendError):
    """A backend (or the server behind it) is down, unreachable or vanished mid-turn."""


class BackendProtocolError(BackendError):
    """A backend returned a malformed result or broke its protocol."""


class EngineError(OmniError):
    """A TensorRT engine could not be built, verified or loaded."""
