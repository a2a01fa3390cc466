"""Every lesson notebook executes top to bottom; a cell that errors (or an inline parity assert
that fails) fails the suite. Lessons are stored without outputs, so this is the only place they run.

Budget: each lesson must finish within LESSON_BUDGET_S on CI's 2 cores; the measured time is
printed (pytest -s, or see the -ra summary for failures) and written to out/lesson_times.tsv.
"""
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.ipynb"))
LESSON_BUDGET_S = 150


def test_there_are_lessons():
    # guards against the parametrised test below silently running on an empty list
    assert len(LESSONS) >= 1, "no lessons/NN_topic.ipynb found"


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_executes(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    env_before = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "Agg"  # the kernel inherits it: figures render without a display
    try:
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        if env_before is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_before
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    with open(out / "lesson_times.tsv", "a") as f:
        f.write(f"{path.name}\t{seconds:.1f}\n")
    print(f"{path.name}: {seconds:.1f} s")
    assert seconds < LESSON_BUDGET_S, f"{path.name} took {seconds:.0f} s, over its {LESSON_BUDGET_S} s budget"
