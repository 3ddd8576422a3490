"""The documentation is current and its links work.

* ``docs/api.md`` is what ``docs/build_api.py`` generates from the docstrings
  of this checkout (edit the docstrings, then run the script);
* every relative link and image of the README and of ``docs/*.md`` points to
  a file that exists, and every ``#anchor`` into ``docs/api.md`` to an entry.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_generated_from_the_docstrings() -> None:
    build_api = _load(ROOT / "docs" / "build_api.py", "docs_build_api")
    expected = build_api.build()
    current = (ROOT / "docs" / "api.md").read_text()
    assert current == expected, "docs/api.md is out of date: run python docs/build_api.py"


def test_api_reference_covers_every_export() -> None:
    import memprof_limits as ml
    from memprof_limits import stats

    text = (ROOT / "docs" / "api.md").read_text()
    for name in [*ml.__all__, *stats.__all__]:
        assert f'<a id="{name.lower()}"></a>' in text, name


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not in code blocks
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.name == "api.md" and f'<a id="{anchor}"></a>' not in api:
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
