"""Errors the user sees: each carries a one-line reason that ends up in the catalog, plan, store or CLI."""


class MrictError(Exception):
    """Base class: the CLI prints ``str(err)`` and exits non-zero, without a traceback."""


class ConfigError(MrictError):
    """A configuration file or option is invalid (unknown key, bad value)."""


class InputError(MrictError):
    """The input URL is empty, missing or unreadable as a whole."""


class StoreMismatchError(MrictError):
    """The output URL already holds a store made from a different plan or configuration."""


class VolumeError(MrictError):
    """A series cannot be turned into a trustworthy volume; ``str(err)`` is the reason."""


class RegistrationError(MrictError):
    """A registration failed or is implausible; ``str(err)`` is the reason."""


class VersionUnavailable(MrictError):
    """A pinned version of a store cannot be served (a patient it held withdrew, or a pair changed since)."""


class LeaseHeld(MrictError):
    """Another run is writing the store (it holds the store's lease)."""
