"""The documents say what the code does: docs/architecture.md names, for
every path that makes a bitmap consistent, exported or recording, the tests
that show its proof, and each must exist; docs/cli.md names every command
and flag that ``dirtydiff --help`` lists; every link between the README and
docs/ leads to a file and a heading that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from tests.conftest import ROOT, dirtydiff

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    found = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_every_link_between_the_documents_leads_somewhere() -> None:
    checked = 0
    for page in DOCUMENTS:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # another site's page
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{page.name}: {target}"
            if anchor:
                assert anchor in anchors(linked), f"{page.name}: {target}"
            checked += 1
    assert checked >= 20


def flags(*command: str) -> set[str]:
    usage = dirtydiff(*command, "--help").stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", usage)) - {"--help"}


def subcommands(*command: str) -> list[str]:
    usage = dirtydiff(*command, "--help").stdout
    listed = usage.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return re.findall(r"^    (\w[\w-]*)", listed, flags=re.M)


def test_the_cli_reference_names_every_command_and_flag() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    headings = anchors(ROOT / "docs" / "cli.md")
    commands = subcommands()
    assert {"track", "scan", "serve", "bitmap", "checkpoint"} <= set(commands)
    missing = []
    for command in commands:
        if command not in headings:
            missing.append(f"## {command}")
        actions = subcommands(command) if command == "bitmap" else []
        for argv in [[command]] if not actions else [[command, a] for a in actions]:
            if len(argv) == 2 and not re.search(rf"`{argv[1]}\b", text):
                missing.append(" ".join(argv))
            missing += [f"{' '.join(argv)} {f}" for f in sorted(flags(*argv)) if f not in text]
    missing += [f for f in sorted(flags()) if f not in text]
    assert not missing, missing
