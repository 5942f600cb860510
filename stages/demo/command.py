"""`qformer demo`, the command: the default pipeline (`pipeline`), or with --instruct the instruction-tuning one
(`instruct`, which reuses the pipeline's steps)."""

from __future__ import annotations

import sys

import stages.demo.pipeline as pipeline
from stages.demo.settings import DemoSettings


def demo(settings: DemoSettings = DemoSettings()) -> int:
    """The main job: stage 1, stage 2 and evaluation end to end on built-in synthetic data (CPU, about 10 minutes).

    Writes data, configs, runs, exports, results.json, samples.png and losses.png under --out.
    """
    try:
        if settings.instruct:
            if settings.lm != "opt":
                raise ValueError(f"--instruct runs with the stand-in OPT (--lm opt), not --lm {settings.lm}")
            from stages.demo.instruct import run_instruct_demo

            run_instruct_demo(settings)
        else:
            pipeline.run_demo(settings)
    except SystemExit as stop:  # a signal (`qformer` exits 128 + it): a stopped fit has said how to resume it
        if isinstance(stop.code, int) and stop.code > 128 and not getattr(stop, "told", False):
            print(f"qformer demo: stopped by a signal (exit status {stop.code}); its steps other than the fits do not "
                  f"resume: rerun qformer demo to start over", file=sys.stderr)
        raise
    return 0
