import os

# One intra-op thread per process, for this process and every subprocess and spawned worker it starts. The test models
# are tiny: a second thread gains little even alone, and as soon as two processes (DDP tests, a subprocess fit, another
# job on the machine) share the 2 cores, OpenMP's spinning threads fight: a 40-step stage-1 fit on a busy 2-core machine
# took 94 s of CPU with 2 threads, 12 s with 1. Set before torch is imported so it also sizes torch's pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file


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
