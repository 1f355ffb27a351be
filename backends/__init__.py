"""Built-in source backends, registered through the ``snapshotter.backends`` entry points."""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """``name``, loaded on the first use of one of its attributes (``importlib.util.LazyLoader``).

    The config file is checked against every configured backend's options on every
    command, which imports the backend modules; SQLAlchemy (~90 ms) is then loaded only
    by commands that touch a SQL source, not by ``list``, ``show`` or ``quarantine``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
