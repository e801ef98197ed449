"""Error types: each says what went wrong, where, and how to fix it."""


class OSPError(Exception):
    """Base class of every error osp-compile raises on purpose."""


class OSPConfigError(OSPError, ValueError):
    """An `OSPConfig` value (or a backend option) that cannot be used."""


class OSPAnalysisError(OSPError):
    """The graph analysis could not prove what a rewrite needs (names the node where it stopped)."""


class OSPUnsupportedError(OSPError):
    """A site or model that the passes cannot convert, with the reason."""


def caused_by(exc: BaseException | None, kind: type) -> bool:
    """Whether `exc` or what it wraps (Dynamo wraps backend errors) is a `kind`."""
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or getattr(exc, "inner_exception", None)
    return False
