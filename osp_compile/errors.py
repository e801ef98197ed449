"""Error types: each says what went wrong, where, and how to fix it."""
import contextlib


class OSPError(Exception):
    """Base class of every error osp-compile raises on purpose."""


class OSPConfigError(OSPError, ValueError):
    """An `OSPConfig` value (or a backend option) that cannot be used."""


class OSPAnalysisError(OSPError):
    """The graph analysis could not prove what a rewrite needs (names the node where it stopped)."""


class OSPUnsupportedError(OSPError):
    """A site or model that the passes cannot convert, with the reason."""


def wrapped(exc: BaseException | None, kind: type) -> BaseException | None:
    """`exc` itself or what it wraps (Dynamo wraps backend errors) that is a `kind`, or None."""
    while exc is not None:
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or getattr(exc, "inner_exception", None)
    return None


def caused_by(exc: BaseException | None, kind: type) -> bool:
    """Whether `exc` or what it wraps is a `kind`."""
    return wrapped(exc, kind) is not None


@contextlib.contextmanager
def unwrapped_osp_errors():
    """Raise the `OSPError` a pass raised instead of Dynamo's ``BackendCompilerFailed`` around it, so
    that ``except OSPConfigError`` catches it and the message is ours alone (the pass's traceback
    stays on it)."""
    try:
        yield
    except Exception as exc:
        ours = wrapped(exc, OSPError)
        if ours is None or ours is exc:
            raise
        raise ours from None
