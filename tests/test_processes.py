"""tests/processes.py: a child forked from the warm fork server is the process `python ARGV` would have been: its own
pid, environment, working folder, arguments, output, exit status and signals."""

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import processes

REPORT = textwrap.dedent("""
    import json, os, sys
    import torch
    print(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv, "marker": os.environ.get("MARKER"),
                      "threads": torch.get_num_threads(), "path0": sys.path[0]}))
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
""")


def test_a_child_has_its_own_environment_folder_arguments_output_and_exit_status(tmp_path):
    env = {"PATH": os.environ["PATH"], "MARKER": "child", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    done = processes.run(["-c", REPORT, "3", "x"], env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 3, done.stderr
    seen = json.loads(done.stdout)
    assert seen["pid"] != os.getpid() and seen["cwd"] == str(tmp_path) and seen["argv"] == ["-c", "3", "x"]
    assert seen["marker"] == "child" and "MARKER" not in os.environ and seen["path0"] == str(tmp_path)
    assert seen["threads"] == 1
    assert done.stderr.strip() == "to stderr"


def test_a_child_runs_a_module_as_main_and_dies_of_the_signal_it_is_sent(tmp_path):
    (tmp_path / "waits.py").write_text("import sys, time\nprint(__name__, sys.argv[1:], flush=True)\ntime.sleep(60)\n")
    child = processes.start(["-m", "waits", "a"], env={**os.environ, "PYTHONPATH": str(tmp_path)})
    stdout = child.output_paths[0]
    deadline = time.monotonic() + 60
    while not stdout.read_text():  # the module has started
        assert child.poll() is None and time.monotonic() < deadline, child.output_paths[1].read_text()
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == -signal.SIGTERM
    assert stdout.read_text() == "__main__ ['a']\n"


def _note_preloaded(rank, folder):
    (Path(folder) / f"rank{rank}").write_text(json.dumps("timm" in sys.modules))


def test_spawned_groups_and_children_are_forked_warm_from_the_preloaded_server(tmp_path):
    """Neither this module nor the child's code imports timm: a child that has it was forked from the fork server
    (a cold spawn would be 5-8 s of imports per process, the cost these helpers exist to avoid)."""
    processes.spawn(_note_preloaded, (str(tmp_path),), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)] == [True, True]
    done = processes.run(["-c", "import sys; print('timm' in sys.modules)"], timeout=60)
    assert done.stdout.strip() == "True", done.stderr
