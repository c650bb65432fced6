"""Session fixtures shared by the accuracy test modules (import them into a module to use them).

The random networks come from :func:`accuracy.evaluators._network`, the same per-process cache the
commands use, so a test session builds each network once (tens of seconds on 2 cores).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def random_inception():
    from accuracy.evaluators import _network

    return _network("inception", None, "cpu")


@pytest.fixture(scope="session")
def random_clip():
    from accuracy.evaluators import _network

    return _network("clip", None, "cpu")
