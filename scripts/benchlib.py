"""What the benchmark scripts share."""
from __future__ import annotations

import importlib.util
import subprocess
import sys


def compile_project() -> None:
    """Bytecode for the project's modules, as an installed package has (pip compiles it at
    install): run from a checkout where Python writes no bytecode (PYTHONDONTWRITEBYTECODE),
    every command would compile each module again, tens of milliseconds of start-up that
    no user pays."""
    dirs = [d for name in ("snapshotter", "backends")
            for d in (importlib.util.find_spec(name).submodule_search_locations or [])]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], check=True)
