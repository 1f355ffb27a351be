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
    specs = {name: importlib.util.find_spec(name) for name in ("snapshotter", "snapshotter_backends")}
    missing = [name for name, spec in specs.items() if spec is None]
    if missing:
        sys.exit(f"benchmark: cannot import {', '.join(missing)}: install the project first "
                 f"(python3 -m pip install -e \".[test]\" from the checkout)")
    dirs = [d for spec in specs.values() for d in (spec.submodule_search_locations or [])]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], check=True)
