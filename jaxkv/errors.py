"""Exceptions raised by jaxkv."""


class JaxkvError(Exception):
    """A user-facing error: bad input, a missing file or resource, an unsupported option.

    The message says what was wrong and, where possible, what to do about it.
    """
