"""Python subprocesses for the tests, forked from a warm interpreter instead of started cold.

A fresh `python -m stages.cli ...` spends 5-8 s of CPU importing torch, Lightning (which imports torchmetrics, hence
torchvision and transformers) before it trains a step; the signal, resume and two-process tests start about twenty
of them. Here they fork from a `multiprocessing` fork server that imported those libraries once per pytest worker.
What the tests check is unchanged: each run is its own process with its own pid, environment, working folder,
output files and exit status, killed and signalled as a `subprocess.Popen` would be; only the import is shared.

The fork server never runs a torch operation before it forks (it only imports), so no OpenMP thread pool is copied
half-alive into a child. Tests whose subject *is* the interpreter's start (which modules a command imports, settings
read at process start) keep a cold `subprocess` run.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Imported once by the fork server; everything else a child imports itself (our own code is cheap to import).
PRELOAD = ["torch", "torchvision", "transformers", "timm", "pytorch_lightning", "jsonargparse"]

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


class Child:
    """The part of `subprocess.Popen` the tests use, for a forked child whose output goes to two files."""

    def __init__(self, process: multiprocessing.process.BaseProcess, args: list[str], stdout: Path, stderr: Path):
        self.process, self.args, self.output_paths = process, args, (stdout, stderr)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode  # as Popen's: the exit status, or -N after signal N

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def send_signal(self, number: int) -> None:
        os.kill(self.pid, number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait (killing the child after `timeout`), then its output as text."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        output = tuple(path.read_text(errors="replace") for path in self.output_paths)
        shutil.rmtree(self.output_paths[0].parent, ignore_errors=True)
        return output

    def finish(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """`communicate`, as the `subprocess.run(..., capture_output=True, text=True)` result."""
        stdout, stderr = self.communicate(timeout)
        return subprocess.CompletedProcess(self.args, self.returncode, stdout, stderr)


def start(argv: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> Child:
    """Start `python -m MODULE ARGS...` or `python -c CODE ARGS...` (argv without the interpreter) in a forked child."""
    if argv[0] not in ("-m", "-c"):
        raise ValueError(f"argv must start with -m or -c, not {argv[0]!r}")
    folder = Path(tempfile.mkdtemp(prefix="child_"))
    stdout, stderr = folder / "stdout", folder / "stderr"
    stdout.touch()
    stderr.touch()  # there from the start, as a pipe would be
    environment = dict(os.environ if env is None else env)
    process = _context.Process(target=_run, args=(argv, environment, str(cwd or os.getcwd()), str(stdout), str(stderr)))
    process.start()
    return Child(process, [sys.executable, *argv], stdout, stderr)


def run(argv: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """`subprocess.run(..., capture_output=True, text=True)` for `start`'s children."""
    return start(argv, env, cwd).finish(timeout)


def torchrun(argv: list[str], nprocs: int, env: dict[str, str] | None = None, cwd: str | Path | None = None,
             timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`torchrun --nproc-per-node NPROCS ARGV...` on one node: one child per rank with the environment torchrun gives
    it (Lightning reads it as launched from outside and starts no process of its own). Each rank's result, rank 0
    first; when one fails, the others are killed rather than left waiting in a collective."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = dict(os.environ if env is None else env)
    ranks = [start(argv, {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
                          "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "tests"}, cwd)
             for rank in range(nprocs)]
    deadline = time.monotonic() + timeout
    while any(child.poll() is None for child in ranks):
        if time.monotonic() > deadline or any(child.poll() not in (None, 0) for child in ranks):
            for child in ranks:
                if child.poll() is None:
                    child.kill()
        time.sleep(0.1)
    return [child.finish() for child in ranks]


def spawn(function, args: tuple, nprocs: int) -> None:
    """`torch.multiprocessing.spawn`, its processes forked from the warm fork server (`function` as spawn needs it:
    importable by name). Unlike `start`'s children they keep the fork server's environment, as spawn's would keep
    the test's: give them what differs as arguments."""
    import torch.multiprocessing

    # start_processes, not spawn: torch.multiprocessing.spawn ignores its start_method and always spawns cold
    torch.multiprocessing.start_processes(function, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def _run(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """In the child: become the process `python ARGV` would have started, then run it as `__main__`."""
    _redirect(stdout, stderr)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # A child of the fork server inherits its start method ("forkserver"), so a DataLoader's workers would be forked
    # by a second fork server instead of by the run itself: a SIGKILLed run then leaves them (and that server) alive,
    # their parent never dying. `python ARGV` starts with the platform's default, and so does the child.
    multiprocessing.set_start_method(None, force=True)
    # What the interpreter's start would have done with this environment: PYTHONPATH first on the path, the thread
    # count (OpenMP read OMP_NUM_THREADS when the fork server loaded it, with the pytest worker's value).
    sys.path[:0] = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    mode, target, *args = argv
    try:
        if mode == "-m":
            sys.argv = [target, *args]  # run_module puts the module's file first, as -m does
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args]
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 (the test's own code)
    finally:
        atexit._run_exitfuncs()  # multiprocessing ends a child with os._exit, which would skip them


def _redirect(stdout: str, stderr: str) -> None:
    for path, fd in ((stdout, 1), (stderr, 2)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
