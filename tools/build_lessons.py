"""Execute every lesson and store what a reader sees: `python3 tools/build_lessons.py [NN ...]`.

* `lessons/NN_topic.ipynb` is the source: committed without outputs, so its diffs show code.
* `lessons/executed/NN_topic.ipynb` is the same notebook executed top to bottom, with every printed
  line and figure (PNG, matplotlib's default 100 dpi). GitHub renders it; nothing needs running.
* `lessons/img/*.png`, the pictures lessons/README.md shows, are cut out of those executed copies:
  a code cell whose metadata has the tag `picture:NAME` gives its (last) figure to `lessons/img/NAME.png`.

tests/test_lessons.py executes every lesson with `execute()` below (CI), checks each "your turn" cell
both ways (its check fails on the empty stub, passes with `lessons/solutions.py`), and fails when an
executed copy's cells differ from its lesson's (a stale copy: rerun this script).
"""
from __future__ import annotations

import ast
import base64
import os
import sys
import textwrap
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
LESSONS_DIR = ROOT / "lessons"
EXECUTED_DIR = LESSONS_DIR / "executed"
IMG_DIR = LESSONS_DIR / "img"
# one BLAS/OpenMP thread: the lessons' arrays are small, and on a busy 2-core machine threads fight
THREADS = {var: "1" for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
EXERCISE_LINE = "with your_turn("


def lessons() -> list[Path]:
    return sorted(LESSONS_DIR.glob("[0-9][0-9]_*.ipynb"))


def executed_path(lesson: Path) -> Path:
    return EXECUTED_DIR / lesson.name


def split_exercise(source: str) -> tuple[str, str, str] | None:
    """A "your turn" cell -> (stub part, the check's body dedented, exercise number), else None.

    The cell is: the stub definitions (what the reader fills in), then `with your_turn("N.M"):` and,
    indented under it, the checks. `your_turn` reports a failing check instead of stopping the
    lesson; the body run bare is the strict check.
    """
    lines = source.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(EXERCISE_LINE)]
    if not starts:
        return None
    start = starts[0]
    number = ast.literal_eval(lines[start][len(EXERCISE_LINE):].split(")")[0])
    return "\n".join(lines[:start]), textwrap.dedent("\n".join(lines[start + 1:])), number


def stub_names(stub: str) -> list[str]:
    """The functions a "your turn" cell asks the reader to write (its top-level defs)."""
    return [node.name for node in ast.parse(stub).body if isinstance(node, ast.FunctionDef)]


class ExerciseError(AssertionError):
    pass


def _run(client, source: str, index: int):
    cell = nbformat.v4.new_code_cell(source)
    client.execute_cell(cell, index)
    return cell


def check_exercise(client, cell, index: int) -> str:
    """The check of one "your turn" cell must fail (AssertionError) on the stub, pass with the solution."""
    stub, check, number = split_exercise(cell.source)
    names = stub_names(stub)
    if not names:
        raise ExerciseError(f"your turn {number}: no function to write above `{EXERCISE_LINE}...)`")
    try:
        _run(client, stub + "\n" + check, index)
    except CellExecutionError as err:
        if err.ename != "AssertionError":
            raise ExerciseError(f"your turn {number}: on the empty stub the check should fail an "
                                f"assert_close, it raised {err.ename}: {err.evalue}") from None
    else:
        raise ExerciseError(f"your turn {number}: the check passes on the empty stub (it cannot fail)")
    solution = f"import importlib, solutions\nimportlib.reload(solutions)\nfrom solutions import {', '.join(names)}\n"
    try:
        _run(client, stub + "\n" + solution + check, index)
    except CellExecutionError as err:
        raise ExerciseError(f"your turn {number}: the check fails with lessons/solutions.py's "
                            f"{', '.join(names)}: {err.ename}: {err.evalue}") from None
    return number


def execute(lesson: Path, check_exercises: bool = False, timeout: int = 600):
    """Run one lesson in a fresh kernel (from lessons/, one thread, inline PNG figures).

    -> (executed notebook, seconds, exercise numbers checked both ways). Raises CellExecutionError
    when a cell fails, ExerciseError when a "your turn" check does not fail on its stub or does not
    pass with its solution.
    """
    notebook = nbformat.read(lesson, as_version=4)
    saved = {var: os.environ.get(var) for var in (*THREADS, "MPLBACKEND")}
    os.environ.update(THREADS)
    os.environ.pop("MPLBACKEND", None)  # the kernel then picks the inline backend: figures become PNG outputs
    checked = []
    try:
        client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(lesson.parent)}})
        start = time.perf_counter()
        with client.setup_kernel():
            for index, cell in enumerate(notebook.cells):
                if cell.cell_type != "code":
                    continue
                client.execute_cell(cell, index)
                if check_exercises and split_exercise(cell.source):
                    checked.append(check_exercise(client, cell, index))
        seconds = time.perf_counter() - start
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    return notebook, seconds, checked


def pictures(notebook) -> dict[str, bytes]:
    """{NAME: png bytes} of the cells tagged `picture:NAME` (their last figure)."""
    found = {}
    for cell in notebook.cells:
        for tag in cell.get("metadata", {}).get("tags", []):
            if not tag.startswith("picture:"):
                continue
            pngs = [out["data"]["image/png"] for out in cell.get("outputs", [])
                    if "data" in out and "image/png" in out["data"]]
            if not pngs:
                raise RuntimeError(f"the cell tagged {tag} drew no figure")
            found[tag.split(":", 1)[1]] = base64.b64decode(pngs[-1])
    return found


def build(lesson: Path) -> float:
    notebook, seconds, _ = execute(lesson)
    EXECUTED_DIR.mkdir(exist_ok=True)
    target = executed_path(lesson)
    tmp = target.with_suffix(".tmp")
    nbformat.write(notebook, tmp)
    tmp.replace(target)  # atomic: a half-written copy never replaces a good one
    for name, png in pictures(notebook).items():
        (IMG_DIR / f"{name}.png").write_bytes(png)
        print(f"  picture lessons/img/{name}.png")
    return seconds


if __name__ == "__main__":
    wanted = sys.argv[1:]
    failed = []
    for lesson in lessons():
        if wanted and not any(lesson.name.startswith(w) for w in wanted):
            continue
        try:
            seconds = build(lesson)
        except CellExecutionError as err:  # keep the old copy, go on with the other lessons
            failed.append(lesson.name)
            print(f"{lesson.name}: FAILED, executed copy not updated\n{str(err)[-2000:]}", file=sys.stderr)
            continue
        size = executed_path(lesson).stat().st_size
        print(f"{lesson.name}: {seconds:.1f} s, executed copy {size / 1e6:.2f} MB")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
