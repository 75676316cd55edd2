"""Collection settings shared by every test folder.

tests/bench holds benchmarks: they are run by hand and never collected. tests/integration is
put on sys.path so that its modules can `import harness`. Tests marked `slow` (long scenarios:
many trials, or one more variant of a capability a faster test already covers) run only with
WAZUH_CLUSTER_TESTS_FULL=1 (`tests/run --full`); the default run deselects them.
"""
from __future__ import absolute_import, division, print_function

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

collect_ignore = ["bench"]

for _path in (os.path.join(HERE, "integration"), os.path.join(os.path.dirname(HERE), "lib")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (item.rep_call...): fixtures print logs on failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


FULL = os.environ.get("WAZUH_CLUSTER_TESTS_FULL") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long scenario, run only by tests/run --full "
                            "(WAZUH_CLUSTER_TESTS_FULL=1)")


def pytest_collection_modifyitems(config, items):
    """Without WAZUH_CLUSTER_TESTS_FULL=1, deselect the slow tests (counted as deselected)."""
    if FULL:
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
