"""Fixtures that several test files share. None is autouse: a file opts in with
``pytestmark = pytest.mark.usefixtures("one_thread")``."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the tiny (often float64) models of these files run many
    times faster than with threads contending on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
