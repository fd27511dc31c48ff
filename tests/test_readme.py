"""The README's test command is what CI runs: `.ci/run` runs the README's lines word for word, and they are the
whole set-up from a fresh clone (a virtual environment, the page test's browser, torch, the test extras)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command():
    """The lines of the bash block under "The tests, from a fresh clone"."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index("The tests, from a fresh clone"):]
    block = re.search(r"```bash\n(.*?)```", after, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def _ci_commands():
    """The lines `.ci/run` runs after moving to the clone's root (comments and shell options left out)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("cd "))
    return [line for line in lines[start + 1:] if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_test_command_word_for_word():
    assert _ci_commands() == _readme_test_command()


def test_the_readme_test_command_is_the_whole_set_up():
    """From a fresh clone: its own virtual environment first (the quick start's is not assumed), Chromium for
    the page test (where it comes from, and what happens without it, are said), torch pinned before the test
    extras, the tests last."""
    lines = _readme_test_command()
    joined = "\n".join(lines)
    assert lines[0] == "python3 -m venv .venv && . .venv/bin/activate"
    assert "apt-get install -y chromium" in lines[1] and "test_serve_page.py will be skipped" in lines[1]
    assert lines[-1] == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert joined.index("venv") < joined.index("chromium") < joined.index("torch==2.13.0") < joined.index("pytest")
    readme = (ROOT / "README.md").read_text()
    prose = readme[readme.index("The tests, from a fresh clone"):readme.index("Tests marked `slow`")]
    assert "/usr/bin/chromium" in prose and "sudo" in prose and "skipped" in prose and "playwright" in prose
    page_test = (ROOT / "tests" / "test_serve_page.py").read_text()
    assert 'CHROMIUM = "/usr/bin/chromium"' in page_test  # where the README says the browser arrives
