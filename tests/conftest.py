import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # setup.cfg runs two pytest-xdist workers: on two cores, two workers of two OpenMP threads each stall one another
    # (a thread spins waiting for a sibling that is not scheduled), so each worker and what it starts uses one thread.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    from qformer.config import preset

    return preset("tiny")


@pytest.fixture
def without_java(monkeypatch):
    """Caption scores as on a machine without Java: pycocoevalcap's Java METEOR and PTB tokenizer start a JVM and
    load METEOR's paraphrase table, ~5-10 s per `eval caption`. One test (the small OPT demo) keeps the Java path."""
    monkeypatch.setattr("stages.eval.metrics.java_available", lambda: False)
