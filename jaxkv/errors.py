"""Exceptions raised by jaxkv."""


class JaxkvError(Exception):
    """A user-facing error: bad input, a missing file or resource, an unsupported option.

    The message says what was wrong and, where possible, what to do about it.
    """


class LoadError(JaxkvError):
    """A checkpoint could not be found or read: a missing file, a directory without config.json,
    an unreadable GGUF, an unknown preset."""


class CheckpointError(LoadError):
    """A checkpoint (model weights, a saved quantized model, a prefix, WKVQuant parameters) is missing,
    corrupt, does not match its configuration (a missing, unmapped or misshapen tensor), or belongs to
    another model or recipe."""


class TokenizerError(LoadError):
    """A tokenizer could not be built (e.g. an unsupported GGUF tokenizer model)."""


class FetchError(JaxkvError):
    """Fetching an embedded model (``jaxkv fetch``) failed."""
