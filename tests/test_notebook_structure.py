"""Every notebook reads as a lesson: it says what the learner will be able to do, explains with at least one
committed figure, and closes with exercises whose folded solutions the notebook tests run (nbval runs every cell)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PLACEHOLDER = re.compile(r"<(?:repository|your|url)[^>]*>|\bTODO\b|\bTBD\b|\bXXX\b", re.IGNORECASE)


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 8


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_opens_with_what_the_learner_will_do(path):
    first = cells(path)[0]
    assert first["cell_type"] == "markdown" and source(first).startswith("# ")
    assert re.search(r"you will", source(first), re.IGNORECASE), f"{path.name}: the first cell should say what " \
                                                                 "the learner will be able to do"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_closes_with_exercises_and_folded_solutions(path):
    all_cells = cells(path)
    starts = [i for i, c in enumerate(all_cells) if c["cell_type"] == "markdown" and source(c).startswith("## Exercises")]
    assert len(starts) == 1, f"{path.name}: one '## Exercises' section expected"
    exercises = re.findall(r"^\d+\. ", source(all_cells[starts[0]]), re.MULTILINE)
    solutions = all_cells[starts[0] + 1:]
    assert 2 <= len(exercises) <= 3 and len(solutions) == len(exercises)
    for cell in solutions:
        assert cell["cell_type"] == "code" and "solution" in cell["metadata"].get("tags", [])
        assert cell["metadata"].get("jupyter", {}).get("source_hidden") is True  # folded until the learner opens it
        assert cell.get("outputs"), f"{path.name}: a solution cell has no committed output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_has_a_committed_figure(path):
    images = [c for c in cells(path) if c["cell_type"] == "code"
              and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert images, f"{path.name}: no figure in the committed outputs"


@pytest.mark.parametrize("path", [*NOTEBOOKS, ROOT / "README.md"], ids=lambda p: p.name)
def test_no_placeholder_text(path):
    if path.suffix == ".ipynb":
        text = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "markdown")
    else:
        text = path.read_text(encoding="utf-8")
    assert not PLACEHOLDER.findall(text), f"{path.name}: placeholder text {PLACEHOLDER.findall(text)}"
