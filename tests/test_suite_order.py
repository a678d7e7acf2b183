"""The suite's own scheduling (tests/conftest.py): the slowest files start first, and `make test` keeps that order."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tests.conftest import SLOWEST_FILES, pytest_collection_modifyitems

TESTS = Path(__file__).resolve().parent


def test_every_listed_slow_file_exists_once():
    assert len(set(SLOWEST_FILES)) == len(SLOWEST_FILES)
    assert [name for name in SLOWEST_FILES if not (TESTS / name).is_file()] == []


def test_slow_files_come_first_in_their_order_then_the_files_with_most_tests():
    def items(name, count):
        return [SimpleNamespace(path=TESTS / name, nodeid=f"tests/{name}::t{i}") for i in range(count)]

    collected = (items("test_a_few.py", 2) + items(SLOWEST_FILES[1], 1) + items("test_many.py", 5)
                 + items(SLOWEST_FILES[0], 3))
    pytest_collection_modifyitems(None, collected)
    files = list(dict.fromkeys(item.path.name for item in collected))
    assert files == [SLOWEST_FILES[0], SLOWEST_FILES[1], "test_many.py", "test_a_few.py"]
    # Within a file the tests keep their order.
    assert [item.nodeid for item in collected[:3]] == [f"tests/{SLOWEST_FILES[0]}::t{i}" for i in range(3)]


def test_make_test_keeps_the_collection_order():
    # Without --no-loadscope-reorder, xdist re-sorts the files by their number of tests.
    makefile = (TESTS.parent / "Makefile").read_text()
    [line] = [line for line in makefile.splitlines() if "-m pytest" in line and "--dist loadfile" in line]
    assert "--no-loadscope-reorder" in line.split()
