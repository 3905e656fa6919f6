import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import CellProcess  # noqa: E402


@pytest.fixture
def cell_factory(tmp_path):
    cells = []

    def make(config: str = "", args: tuple = (), env: dict | None = None, wait: bool = True) -> CellProcess:
        c = CellProcess(tmp_path, config, args, env)
        cells.append(c)
        return c.start(wait=wait)

    yield make
    for c in cells:
        if c.alive():
            c.proc.kill()
            c.proc.wait(5)


@pytest.fixture
def cell(cell_factory):
    return cell_factory()


