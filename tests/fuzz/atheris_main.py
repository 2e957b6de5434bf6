"""Running a target under atheris (libFuzzer): ``python -m tests.fuzz.<target>
[libFuzzer flags] [corpus dirs]``, e.g. ``-atheris_runs=N tests/fuzz/corpus/nbd``."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

# The product's code and the targets' own walkers give libFuzzer its
# feedback; instrumenting everything loaded (numpy, hypothesis, asyncio) took
# minutes before the first input.
INSTRUMENTED = ("dirtydiff", "sidecar", "nbd_plugins", "tests.fuzz")


def _functions(module: Any) -> list[Any]:
    found = []
    for value in vars(module).values():
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value):
            found.append(value)
        elif inspect.isclass(value):
            for attr in vars(value).values():
                # Methods, static and class methods, property accessors.
                for candidate in (attr, getattr(attr, "__func__", None)):
                    if inspect.isfunction(candidate):
                        found.append(candidate)
                if isinstance(attr, property):
                    found += [f for f in (attr.fget, attr.fset) if inspect.isfunction(f)]
    return found


def fuzz(one_input: Callable[[bytes], None], setup: Callable[[], None] | None = None) -> None:
    # atheris ships no type information; the module is optional (dev extra).
    atheris: Any = importlib.import_module("atheris")
    for name, module in list(sys.modules.items()):
        # The target itself runs as __main__ (python -m tests.fuzz.<target>).
        if name == "__main__" or name.startswith(INSTRUMENTED):
            for function in _functions(module):
                atheris.instrument_func(function)  # nested functions too
    if setup is not None:
        setup()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
