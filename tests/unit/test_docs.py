"""The documentation: the MkDocs site builds with --strict (no broken link or anchor, every page in
the nav), the README stays a front door, nothing links outside the repository, and the reference
pages generated at build time (scripts/gen_docs.py) list every setting, command and table."""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = [m for m in ("mkdocs", "material") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(
            f"the docs test needs {' and '.join(missing)} in this environment ({sys.executable}): "
            "pip install mkdocs==1.6.1 mkdocs-material==9.8.1",
            pytrace=False,
        )
    out = tmp_path_factory.mktemp("site")
    p = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert p.returncode == 0, f"mkdocs build --strict failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return out


def _page(site: Path, uri: str) -> str:
    return (site / uri / "index.html").read_text()


def _sections(page: str) -> dict[str, str]:
    """h2 id → the HTML from that heading to the next h2."""
    parts = re.split(r'(?=<h2 id=")', page)
    return {m.group(1): part for part in parts if (m := re.match(r'<h2 id="([^"]+)"', part))}


def _codes(fragment: str) -> set[str]:
    return {html.unescape(c) for c in re.findall(r"<code>(.*?)</code>", fragment, re.DOTALL)}


def test_the_site_builds_strictly(site):
    assert (site / "index.html").is_file()
    for page in ("guarantees", "design", "reference/config", "reference/cli", "reference/tables"):
        assert (site / page / "index.html").is_file(), page


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    assert "scripts/dev.py run" in text and "scripts/dev.py test" in text


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks and inline code spans."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"(`+).+?\1", "", text, flags=re.DOTALL)


def test_nothing_links_outside_the_repository(site):
    for f in _doc_files():
        prose = _prose(f.read_text())
        found = re.findall(r"https?://\S*", prose)
        assert not found, f"{f.relative_to(ROOT)} links outside the repository: {found[:3]}"
    for page in site.rglob("*.html"):
        found = re.findall(r'(?:href|src)="(?:https?:)?//[^"]*"', page.read_text())
        assert not found, f"{page.relative_to(site)} links outside the site: {found[:3]}"


def test_the_readmes_links_resolve():
    text = _prose((ROOT / "README.md").read_text())
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def _models_in(annotation) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type] = []
    for arg in typing.get_args(annotation):
        out += [m for m in _models_in(arg) if m not in out]
    return out


def _config_paths() -> list[str]:
    """Every setting's dotted path, depth-first in declaration order; a settings class reached a
    second time (a judge's own `model`, the other stages' placement) is documented once, at its first
    path; `[]` marks a list's items."""
    from flywheel.config import FlywheelConfig

    seen: dict[type, str] = {FlywheelConfig: ""}
    paths: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        later = []
        for name, field in cls.model_fields.items():
            path = f"{prefix}.{name}" if prefix else name
            paths.append(path)
            is_list = typing.get_origin(field.annotation) in (list, tuple)
            for m in _models_in(field.annotation):
                if m not in seen:
                    seen[m] = f"{path}[]" if is_list else path
                    later.append(m)
        for m in later:
            walk(m, seen[m])

    walk(FlywheelConfig, "")
    return paths


def test_the_config_reference_lists_every_setting(site):
    codes = _codes(_page(site, "reference/config"))
    paths = _config_paths()
    assert len(paths) > 100
    missing = [p for p in paths if p not in codes]
    assert not missing, f"reference/config.md lacks {missing[:5]}"


def _commands() -> list[tuple[str, argparse.ArgumentParser]]:
    from flywheel.flows.cli import build_parser

    out = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append((f"{prefix} {name}", sub))
                    walk(sub, f"{prefix} {name}")

    walk(build_parser(), "flywheel")
    return out


def test_the_cli_reference_lists_every_command_and_option(site):
    sections = _sections(_page(site, "reference/cli"))
    commands = _commands()
    assert {"flywheel run", "flywheel sql"} <= {c for c, _ in commands}
    for command, parser in commands:
        anchor = command.replace(" ", "-")
        assert anchor in sections, f"reference/cli.md has no section for `{command}`"
        names = {n.strip() for code in _codes(sections[anchor]) for n in code.split(",")}
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            wanted = action.option_strings or [action.metavar or action.dest]
            assert set(wanted) <= names, f"reference/cli.md: `{command}` lacks {wanted}"


def test_the_tables_reference_lists_every_table_and_column(site):
    from flywheel.storage.schemas import TABLES

    sections = _sections(_page(site, "reference/tables"))
    for table, schema in TABLES.items():
        assert table in sections, f"reference/tables.md has no section for table {table}"
        codes = _codes(sections[table])
        missing = [f.name for f in schema if f.name not in codes]
        assert not missing, f"reference/tables.md: table {table} lacks columns {missing}"
