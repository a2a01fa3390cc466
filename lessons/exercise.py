"""`your_turn`: the check under a "your turn" cell reports instead of stopping the lesson.

    def my_slopes(n_heads):
        ...  # your code

    with your_turn("6.1"):
        assert_close(my_slopes(12), alibi_slopes(12), rtol=0, atol=0, what="my_slopes(12)")

While the function is still the empty stub (or not right yet) the lesson prints what failed and
goes on; once it is right it prints a tick. The body under `with` is the real check: CI runs it
bare, and requires it to fail on the stub and to pass with lessons/solutions.py.
"""
from contextlib import contextmanager


@contextmanager
def your_turn(number: str):
    try:
        yield
    except Exception as err:  # noqa: BLE001 — any failure of the learner's attempt is reported, not raised
        message = str(err).splitlines()[0][:160] if str(err) else ""
        print(f"your turn {number}: not yet ({type(err).__name__}: {message})\n"
              f"    one solution is in lessons/solutions.py")
    else:
        print(f"your turn {number}: correct ✓")
