"""`qformer demo`: the whole pipeline on built-in data. `pipeline` runs it, `language_model` is the stand-in LLM,
`figures` draws the pictures, `settings` holds the settings, architectures and configs."""

from stages.demo.pipeline import demo, run_demo
from stages.demo.settings import DemoSettings

__all__ = ["DemoSettings", "demo", "run_demo"]
