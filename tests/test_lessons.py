"""Every lesson notebook executes top to bottom; a cell that errors (or an inline parity assert
that fails) fails the suite. Every "your turn" cell's check is run bare twice in the same kernel:
it must FAIL (an AssertionError) on the empty stub and PASS with lessons/solutions.py — a check
that cannot fail, or a solution that does not pass, fails the lesson.

The lessons are stored without outputs (lessons/NN_*.ipynb, readable diffs); what a reader sees is
lessons/executed/NN_*.ipynb, written by tools/build_lessons.py. A copy whose cells differ from its
lesson's is stale, and fails here.

Budget: each lesson (exercise checks included) must finish within LESSON_BUDGET_S on CI's 2 cores;
the measured time is printed (pytest -s) and written to out/lesson_times.tsv.
"""
import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_lessons  # noqa: E402

LESSONS = build_lessons.lessons()
LESSON_BUDGET_S = 150
MIN_EXERCISES = 2  # "your turn" cells per lesson, from lesson 02 on


def test_there_are_lessons():
    # guards against the parametrised tests below silently running on an empty list
    assert len(LESSONS) >= 14, f"expected at least 14 lessons/NN_topic.ipynb, found {len(LESSONS)}"


def cells(path):
    return [(cell.cell_type, cell.source) for cell in nbformat.read(path, as_version=4).cells]


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_executed_copy_is_current(path):
    executed = build_lessons.executed_path(path)
    assert executed.exists(), f"{executed.relative_to(ROOT)} is missing: run python3 tools/build_lessons.py {path.name[:2]}"
    stale = [i for i, (a, b) in enumerate(zip(cells(path), cells(executed))) if a != b]
    assert len(cells(path)) == len(cells(executed)) and not stale, (
        f"{executed.relative_to(ROOT)} is stale (cells {stale or 'count'} differ from {path.name}): "
        f"run python3 tools/build_lessons.py {path.name[:2]}")
    notebook = nbformat.read(executed, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"{executed.name} has code cells that were never executed"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{executed.name} holds an error output: {errors[0].ename}"


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_source_has_no_outputs(path):
    raw = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(raw["cells"]) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; the executed copy holds them (clear them here)"


@pytest.mark.parametrize("path", LESSONS[1:], ids=[p.stem for p in LESSONS[1:]])
def test_lesson_has_exercises(path):
    found = [build_lessons.split_exercise(src) for kind, src in cells(path) if kind == "code"]
    numbers = [f[2] for f in found if f]
    assert len(numbers) >= MIN_EXERCISES, f"{path.name} has {len(numbers)} 'your turn' cells, want >= {MIN_EXERCISES}"
    assert len(set(numbers)) == len(numbers), f"{path.name}: exercise numbers repeat: {numbers}"


def test_split_exercise_reads_a_your_turn_cell():
    source = 'def f(x):\n    ...  # yours\n\nwith your_turn("2.1"):\n    assert_close(f(1), 2, rtol=0, atol=0)\n'
    stub, check, number = build_lessons.split_exercise(source)
    assert number == "2.1" and build_lessons.stub_names(stub) == ["f"]
    assert check.strip() == "assert_close(f(1), 2, rtol=0, atol=0)"
    assert build_lessons.split_exercise("x = 1") is None


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_executes(path):
    _, seconds, checked = build_lessons.execute(path, check_exercises=True)
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    with open(out / "lesson_times.tsv", "a") as f:
        f.write(f"{path.name}\t{seconds:.1f}\n")
    print(f"{path.name}: {seconds:.1f} s, exercises checked both ways: {checked}")
    assert seconds < LESSON_BUDGET_S, f"{path.name} took {seconds:.0f} s, over its {LESSON_BUDGET_S} s budget"


def test_exercise_checks_have_teeth(tmp_path):
    # the both-ways check itself: a check that passes on the stub, and a solution that fails its
    # check, must each be refused (solutions here come from a solutions.py beside the notebook)
    (tmp_path / "solutions.py").write_text("def double(x):\n    return 2 * x\n\ndef triple(x):\n    return 2 * x\n")
    (tmp_path / "exercise.py").write_text((ROOT / "lessons" / "exercise.py").read_text())
    good = 'from exercise import your_turn\n\ndef double(x):\n    ...\n\nwith your_turn("1.1"):\n    assert double(2) == 4\n'
    toothless = 'def double(x):\n    ...\n\nwith your_turn("1.2"):\n    assert double(2) is None or double(2) == 4\n'
    wrong_solution = 'def triple(x):\n    ...\n\nwith your_turn("1.3"):\n    assert triple(2) == 6\n'
    for name, source, expected in (("good", good, None), ("toothless", toothless, "passes on the empty stub"),
                                   ("wrong", wrong_solution, "fails with lessons/solutions.py")):
        path = tmp_path / f"00_{name}.ipynb"
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(good.split("\n\n")[0]),
                                                   nbformat.v4.new_code_cell(source)])
        nbformat.write(notebook, path)
        if expected is None:
            assert build_lessons.execute(path, check_exercises=True)[2] == ["1.1"]
        else:
            with pytest.raises(build_lessons.ExerciseError, match=expected):
                build_lessons.execute(path, check_exercises=True)


def test_readme_pictures_are_the_executed_figures():
    # lessons/img/NAME.png is cut from the executed copy's cell tagged picture:NAME; a picture that
    # differs was drawn by older code (the committed rope_atlas.png once printed a literal "ω_j")
    found = {}
    for path in LESSONS:
        executed = build_lessons.executed_path(path)
        if executed.exists():
            found.update(build_lessons.pictures(nbformat.read(executed, as_version=4)))
    readme = (ROOT / "lessons" / "README.md").read_text()
    shown = set(re.findall(r"\(img/([\w-]+)\.png\)", readme))
    assert shown and shown <= set(found), f"README pictures without a tagged cell: {sorted(shown - set(found))}"
    stale = [name for name, png in found.items() if (build_lessons.IMG_DIR / f"{name}.png").read_bytes() != png]
    assert not stale, f"lessons/img/{stale[0]}.png differs from its executed cell: run python3 tools/build_lessons.py"
