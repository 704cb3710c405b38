"""Fixtures shared by the tests; the models and helpers they use live in the ``helpers`` package."""

from __future__ import annotations

import os

import pytest
import torch

from helpers.tiny_models import TINY_MODELS, TinyModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network

# The server tests' fixtures (session-scoped: one tiny server for the whole run)
pytest_plugins = ["helpers.serve"]


@pytest.fixture(params=TINY_MODELS, ids=lambda m: m.name)
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module: tiny matrices run fastest so, and do not fight other tests for cores.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama and its tokenizer saved to a directory (tests/helpers/tiny_lm.py), once per module."""
    from helpers.tiny_lm import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny-llama"))
