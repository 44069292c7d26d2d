"""README.md stays true: its python blocks run, and CI runs its test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
TEST_COMMAND = 'pip install --no-build-isolation -e ".[test,examples,onnx]"'
# The output of benchmarks/time_first_contact.sh that the quick start quotes.
FIRST_CONTACT = ROOT / "benchmarks" / "results" / "first_contact.txt"


def test_readme_has_runnable_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


def test_ci_runs_the_readme_test_command():
    readme_line = next(line for line in README.splitlines() if line.startswith(TEST_COMMAND))
    assert readme_line.endswith("&& python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    install, _, test = readme_line.partition(" && ")
    assert install in ci and f"&& {test}" in ci


def test_ci_runs_the_slow_tests_after_the_readme_command():
    """The default run skips the tests marked slow (tests/conftest.py); CI runs them next."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme_command = ci.index("&& python -m pytest\n")
    assert ci.index("\nFASTBIRNN_SLOW_TESTS=1 python -m pytest -m slow\n") > readme_command
    assert "FASTBIRNN_SLOW_TESTS=1" in README


def test_quick_start_times_are_the_committed_measurement():
    section = README[README.index("## Quick start"):README.index("## Using it")]
    quoted = re.findall(r"\b\d+\.\d s\b", section)
    assert len(quoted) >= 3, "the quick start states the measured times of both commands"
    measured = FIRST_CONTACT.read_text()
    for time in quoted:
        assert time in measured, f"{time} is not in {FIRST_CONTACT.name}"
