"""The README's two set-up commands come first, and .ci/run runs the second one verbatim."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("    python3 -m venv")
    ]


def test_readme_starts_with_the_two_commands() -> None:
    setup, tests = _commands()[:2]
    assert setup.endswith("kerasrt demo")
    assert tests.endswith("pytest -n 2")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci
