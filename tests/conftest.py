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


# The files that take longest (subprocess fits, two-process groups, the demos, the GGUF read), longest first, go to
# the two xdist workers before the rest, so that the many short files fill in at the end and both workers finish
# together. xdist would otherwise order files by their number of tests (setup.cfg turns that off), which put these
# last, with one worker idle while the other ran them. Measured with `pytest --durations=60`; an order, nothing else.
LONGEST_FIRST = ("test_resume.py", "test_signals.py", "test_demo.py", "test_ddp.py", "test_evaluation.py",
                 "test_shards.py", "test_llm.py", "test_architecture.py", "test_training_guards.py", "test_transfer.py",
                 "test_export_safety.py", "test_stage2.py", "test_speed_options.py", "test_losses.py",
                 "test_shared_image_kv.py", "test_serve.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


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
