"""The worked examples of docs/extending.md run as written against today's code (each ```python block is a
standalone script, run in its own process so that the registry and estimator changes it makes stay there)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_the_guide_has_its_three_examples() -> None:
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_extending_example_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / f"example_{index}.py"
    script.write_text(BLOCKS[index])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r'docs/([\w-]+\.md)((?:,?\s+(?:sections?\s+)?(?:and\s+)?"[^"]+")*)')


def test_every_document_and_section_a_docstring_cites_exists() -> None:
    """`docs/<name>.md, "Section"` in the package's text names a file of docs/ and one of its headings."""
    cited = 0
    for source in sorted((ROOT / "fxquant").rglob("*.py")):
        text = source.read_text()
        for match in CITATION.finditer(text):
            doc = ROOT / "docs" / match.group(1)
            assert doc.exists(), f"{source.name} cites {doc.name}, which is not in docs/"
            headings = [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]
            for title in (" ".join(t.split()) for t in re.findall(r'"([^"]+)"', match.group(2))):
                cited += 1
                assert any(title in heading for heading in headings), f"{source.name} cites {doc.name}, {title!r}"
    assert cited > 20
