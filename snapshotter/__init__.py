"""snapshotter: snapshot, restore and quarantine the state of AI agents.

``snapshotter.Repository`` is the Python API (:mod:`snapshotter.api`); the error
types are those of :mod:`snapshotter.errors`.  Both are imported on first use,
so ``import snapshotter`` stays cheap for the command-line program.
"""

__version__ = "0.1.0"

_ERRORS = ("SnapshotterError", "UsageError", "ConfigError", "IntegrityError", "LockedError", "NotFound", "Refused",
           "Interrupted", "AuditNotWritten")
__all__ = ["Repository", "Quarantine", *_ERRORS, "__version__"]


def __getattr__(name: str):
    if name in ("Repository", "Quarantine"):
        from . import api
        return getattr(api, name)
    if name in _ERRORS:
        from . import errors
        return getattr(errors, name)
    raise AttributeError(f"module 'snapshotter' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
