import os
from collections.abc import Iterator

import pytest

pytest_plugins = ["busagents.testing", "busagents.llm.testing"]


@pytest.fixture(autouse=True, scope="session")
def _own_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Commands the tests run never find a busagents server the user started (it is recorded in the
    user's data directory) nor write there: BUSAGENTS_DATA_DIR is the session's own."""
    before = os.environ.get("BUSAGENTS_DATA_DIR")
    os.environ["BUSAGENTS_DATA_DIR"] = str(tmp_path_factory.mktemp("busagents-data"))
    yield
    if before is None:
        os.environ.pop("BUSAGENTS_DATA_DIR", None)
    else:
        os.environ["BUSAGENTS_DATA_DIR"] = before
