"""Run the examples of docs/recovering.md (a guide whose examples must stay true)."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "recovering.md"
FENCE = re.compile(r"^```[a-z]*$", re.MULTILINE)


class MarkdownParser(doctest.DocTestParser):
    """Doctest examples in fenced Markdown code blocks: a fence line ends the expected output
    (it becomes a blank line), so the Markdown needs no blank line before its closing fence."""

    def parse(self, string: str, name: str = "<string>") -> list[str | doctest.Example]:
        return super().parse(FENCE.sub("", string), name)


def test_recovering_guide_examples() -> None:
    result = doctest.testfile(
        str(GUIDE),
        module_relative=False,
        parser=MarkdownParser(),
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        raise_on_error=False,
        verbose=False,
    )
    assert result.attempted >= 40, f"only {result.attempted} examples found in {GUIDE.name}"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed (see above)"


def test_the_guide_states_the_three_rules() -> None:
    text = GUIDE.read_text()
    for number, rule in enumerate(
        ("Do not rely on the returned exception", "Re-raise interrupts promptly", "Isolate state"),
        start=1,
    ):
        assert f"{number}. {rule}." in text  # the summary
        assert f"## {number}. {rule}" in text  # its section
