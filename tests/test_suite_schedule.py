"""The suite's own xdist scheduling (tests/conftest.py): under ``-n 2`` a module-scoped fixture is built once."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SUITE = '''
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def built():
    with open(Path(__file__).with_name("builds.txt"), "a", encoding="utf-8") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
    return 1


@pytest.mark.parametrize("i", range(8))
def test_uses(built, i):
    assert built == 1


@pytest.mark.parametrize("i", range(8))
def test_plain(i):
    assert i < 8
'''


def test_tests_sharing_a_module_fixture_run_in_one_worker_that_builds_it_once(tmp_path: Path) -> None:
    """xdist's default dealing gave the 8 tests of a module fixture to both workers, which both built it (a
    ``--quick`` replication, an FSDP run...). With the suite's conftest the 8 run in one worker and the fixture is
    built once; the other tests still all run. (pyproject's ``--dist loadgroup`` with marks would not do: with
    pytest 9.2 it silently grouped nothing.)"""
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_generated.py").write_text(SUITE, encoding="utf-8")
    # run as from a shell: this test's own worker's PYTEST_XDIST_WORKER would make the inner controller take itself
    # for a worker (conftest's _shared_root) and look for the groups elsewhere than its workers write them
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider", "--basetemp",
                          str(tmp_path / "basetemp"), "test_generated.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ran = re.findall(r"\[(gw\d)\] \[ *\d+%\] PASSED test_generated\.py::(test_\w+)\[(\d)\]", res.stdout)
    assert sorted((name, int(i)) for _, name, i in ran) == [(n, i) for n in ("test_plain", "test_uses") for i in range(8)]
    assert len({gw for gw, name, _ in ran if name == "test_uses"}) == 1
    assert (tmp_path / "builds.txt").read_text(encoding="utf-8").split() == [
        next(gw for gw, name, _ in ran if name == "test_uses")]
