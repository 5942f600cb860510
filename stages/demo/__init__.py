"""`qformer demo`: the whole pipeline on built-in data. `command` is the command, `pipeline` runs it, `language_model` is the stand-in LLM,
`figures` draws the pictures, `settings` holds the settings, architectures and configs."""

from stages.demo.command import demo
from stages.demo.pipeline import run_demo
from stages.demo.settings import DemoSettings

__all__ = ["DemoSettings", "demo", "run_demo"]
