"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_command() -> str:
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert len(lines) == 1, lines
    return lines[0]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```bash")[1:]
    commands = [ln.strip() for b in blocks for ln in b.split("```")[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert _ci_command() in commands[:2], "the README's first two commands must include the CI test command"
