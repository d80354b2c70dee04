"""Errors CLAM raises: each names the problem and the fix."""


class CLAMError(Exception):
    """Base class of every error CLAM raises on purpose."""


class InputError(CLAMError, ValueError):
    """An image, file or argument CLAM cannot use."""


class BundleError(CLAMError):
    """A model bundle that is missing, tampered with, truncated or incompatible."""
