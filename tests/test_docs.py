"""docs/architecture.md names, for every path that makes a bitmap consistent,
exported or recording, the tests that show its proof: each must exist."""

from __future__ import annotations

import importlib
import re

from tests.conftest import ROOT


def test_every_test_the_architecture_names_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = 0
    for cell in re.findall(
        r"`(test_\w+)::(\w+)(?:\[[^\]]*\])?`((?:, `::\w+(?:\[[^\]]*\])?`)*)", text
    ):
        module, first, more = cell
        found = importlib.import_module(f"tests.{module}")
        for name in [first, *re.findall(r"::(\w+)", more)]:
            assert callable(getattr(found, name, None)), f"{module}::{name}"
            named += 1
    assert named >= 30
