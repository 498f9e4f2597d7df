"""Importing the reference libraries (torch, transformers) in tests.

Outside CI a missing reference library skips the tests that need it (so the
rest of the suite runs, e.g. on a GPU machine without torch). Under CI
(``CI`` set) it is a hard import: a broken install fails loudly instead of
silently skipping the parity checks.
"""

import importlib
import os

import pytest


def require(name: str):
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)
