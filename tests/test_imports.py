"""Every module of the package imports alone: no import cycle hides behind the order in which the test suite
happens to import things.

One fresh interpreter imports the whole package once, so that every third-party library it uses (torch,
transformers and its lazily loaded parts, ...) is loaded, then forks a child per module. Each child forgets
every opdistill module and imports just its own, from source: what a fresh interpreter would do, without ~40
start-ups of torch and transformers."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import opdistill

CHECK = """
import importlib, os, sys
for name in sys.argv[1:]:  # the parent: load what the package imports (a module that fails is the child's)
    try:
        importlib.import_module(name)
    except BaseException:
        pass
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        for loaded in [m for m in sys.modules if m == "opdistill" or m.startswith("opdistill.")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except BaseException as err:
            print(f"{name}: {type(err).__name__}: {err}", flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
sys.exit(1 if failed else 0)
"""


def modules() -> list[str]:
    found = [
        info.name
        for info in pkgutil.walk_packages(opdistill.__path__, prefix="opdistill.")
        if not info.name.endswith("__main__")  # running it is the CLI itself (tested in test_cli.py)
    ]
    return ["opdistill", *found]


def test_every_module_imports_alone():
    names = modules()
    assert {"opdistill.training.coldstart", "opdistill.data.selection", "opdistill.training.loop"} <= set(
        names
    )
    result = subprocess.run([sys.executable, "-c", CHECK, *names], capture_output=True, text=True)
    assert result.returncode == 0, f"modules that fail to import alone:\n{result.stdout}{result.stderr}"
