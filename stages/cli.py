"""The `qformer` command: a table of names -> typed, documented functions, each in the module that owns its logic.

Options are generated from each function's signature and docstring (parsed with docstring_parser, as jsonargparse
does): a parameter without a default is a positional argument, a keyword-only one a required `--option`;
`list[str]` takes one or more values, `bool` is a flag, `X | None` may be left out, and a dataclass parameter
(GenerationSettings, EvalOptions, DemoSettings) gives one option per field. Names keep the dashes of a command line
(`--k-test`, `--num-beams`). `qformer stage1|stage2 fit|validate` hand over to LightningCLI (`stages.train.lightning_cli`).

A user's mistake ends in one line, `qformer COMMAND: error: ...`, exit status 2; `--debug` (or QFORMER_DEBUG=1)
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import os
import signal
import sys
import types
import typing

COMMANDS: dict = {
    "demo": "stages.demo:demo",
    "demo-finetune": "stages.demo.finetune:demo_finetune",
    "info": "stages.tools.info:info",
    "make-data": "stages.data.synthetic:make_data",
    "make-shards": "stages.tools.make_shards:make_shards",
    "export": "stages.tools.export:export",
    "cache-features": "stages.tools.cache_features:cache_features",
    "caption": "stages.apps.generate:caption",
    "ask": "stages.apps.generate:ask",
    "index": "stages.apps.search:index",
    "search": "stages.apps.search:search",
    "serve": "stages.apps.serve:serve",
    "eval": {
        "retrieval": "stages.eval.retrieval:eval_retrieval",
        "caption": "stages.eval.caption:eval_caption",
        "vqa": "stages.eval.vqa:eval_vqa",
    },
    "import": {"lavis": "stages.tools.interop:import_lavis", "hf": "stages.tools.interop:import_hf"},
    "export-hf": "stages.tools.interop:export_hf",
}
TRAINING = {
    "stage1": "stage-1 training: qformer stage1 {fit,validate} --config FILE [--model.* --data.* --trainer.*]",
    "stage2": "stage-2 training: qformer stage2 {fit,validate} --config FILE --model.stage1 DIR [...]",
}


# --- from a function to options ---------------------------------------------------------------------------
def _function(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _docs(obj) -> tuple[str, dict[str, str]]:
    import docstring_parser

    doc = docstring_parser.parse(inspect.getdoc(obj) or "")
    text = "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)
    return text, {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(hint):
    """`X | None` -> (X, True); anything else -> (hint, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _add_parameter(parser: argparse.ArgumentParser, name: str, hint, default, help_text: str, positional: bool) -> None:
    hint, optional = _unwrap_optional(hint)
    kwargs: dict = {"help": help_text or None}
    if typing.get_origin(hint) is list:
        kwargs.update(nargs="+", type=typing.get_args(hint)[0])
    elif typing.get_origin(hint) is typing.Literal:
        kwargs.update(choices=list(typing.get_args(hint)))
    elif hint is bool:
        kwargs.update(action=argparse.BooleanOptionalAction if default is True else "store_true")
    else:
        kwargs.update(type=hint)
    if positional:
        parser.add_argument(name, **kwargs)
        return
    required = default is inspect.Parameter.empty
    if not required:
        kwargs["default"] = default
        if hint is not bool and default is not None and kwargs["help"]:
            kwargs["help"] += f" (default: {default})"
    elif optional:
        required, kwargs["default"] = False, None
    if kwargs["help"]:
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse expands %-formats in help texts
    parser.add_argument(_option(name), dest=name, required=required, **kwargs)


def add_function(parser: argparse.ArgumentParser, function) -> None:
    """One argument per parameter of `function`, one per field of a dataclass parameter, help from the docstrings."""
    description, helps = _docs(function)
    parser.description = description
    hints = typing.get_type_hints(function)
    for name, param in inspect.signature(function).parameters.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            _, field_helps = _docs(hint)
            for field in dataclasses.fields(hint):
                _add_parameter(parser, field.name, typing.get_type_hints(hint)[field.name], _field_default(param, field),
                               field_helps.get(field.name, ""), positional=False)
            continue
        positional = param.default is inspect.Parameter.empty and param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        _add_parameter(parser, name, hint, param.default, helps.get(name, ""), positional)


def _field_default(param: inspect.Parameter, field: dataclasses.Field):
    """A dataclass option's default: the parameter's default instance (CAPTION_GENERATION, ...) or the field's own."""
    if param.default is not inspect.Parameter.empty:
        return getattr(param.default, field.name)
    return inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default


def call(function, values: dict):
    """Call `function` with parsed values, rebuilding its dataclass parameters from their fields."""
    hints = typing.get_type_hints(function)
    args, kwargs = [], {}
    for name, param in inspect.signature(function).parameters.items():
        if dataclasses.is_dataclass(hints[name]):
            value = hints[name](**{f.name: values[f.name] for f in dataclasses.fields(hints[name])})
        else:
            value = values[name]
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[name] = value
        else:
            args.append(value)
    return function(*args, **kwargs)


def command_line(command: str, function, values: dict) -> str:
    """The `qformer ...` line that runs `function` with `values` (every parameter's value; defaults left out): what a
    folder records so that a user can rerun (and so resume) the command that made it. `parse(command_line(...))` gives
    `values` back (tested)."""
    import shlex

    words = ["qformer", *command.split()]
    hints = typing.get_type_hints(function)
    for name, param in inspect.signature(function).parameters.items():
        value, hint = values[name], _unwrap_optional(hints[name])[0]
        if param.default is inspect.Parameter.empty and param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            words += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif value is None or value == param.default and param.default is not inspect.Parameter.empty:
            continue
        elif hint is bool:
            words.append(_option(name) if value else "--no-" + name.replace("_", "-"))
        else:
            words += [_option(name), *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return shlex.join(words)


# --- the parser -----------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): the mistake and, for a misspelt option, the closest valid one."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unknown(self, words: list[str]) -> typing.NoReturn:
        options = [o for action in self._actions for o in action.option_strings]
        message = "unrecognized arguments: " + " ".join(words)
        for word in words:
            close = difflib.get_close_matches(word.split("=")[0], options, n=1)
            if word.startswith("-") and close:
                message += f" (did you mean {close[0]}?)"
                break
        self.error(message)


def leaf_parser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The (sub)command parser that `words` (command, task) lead to."""
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return parser


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`; only the chosen command's module is imported (the others on --help)."""
    parser = Parser(prog="qformer", description="BLIP-2 Q-Former two-stage trainer")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, target in COMMANDS.items():
        _add_command(commands, name, target, load=chosen in (name, None) or "--help" in argv or "-h" in argv)
    for name, text in TRAINING.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _add_command(commands, name: str, target, load: bool) -> None:
    if isinstance(target, dict):
        group = commands.add_parser(name, help=f"{name} " + "|".join(target))
        sub = group.add_subparsers(dest="task", required=True, parser_class=Parser, metavar="TASK")
        for task, inner in target.items():
            _add_command(sub, task, inner, load)
        return
    if not load:
        commands.add_parser(name)
        return
    function = _function(target)
    sub = commands.add_parser(name, help=_docs(function)[0].split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_function(sub, function)
    sub.set_defaults(function=function)


# --- running ------------------------------------------------------------------------------------------------
def user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can raise: reported in one line, not as a traceback."""
    import pickle

    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from stages.train.base import TrainingStopped

    return ValueError, OSError, KeyError, MisconfigurationException, pickle.UnpicklingError, TrainingStopped


def describe(error: BaseException) -> str:
    from qformer.files import unpickling_refusal

    refusal = unpickling_refusal(error)
    if refusal:
        return f"--ckpt_path: {refusal}"
    if isinstance(error, KeyError):
        return str(error.args[0]) if error.args else "KeyError"
    if type(error).__name__ == "MisconfigurationException":  # Lightning's word for a --trainer.* setting it cannot use
        return f"{error} (check the --trainer.* options)"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: a half-written folder (`.NAME.partial-*`) is removed on the way out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = bool(os.environ.get("QFORMER_DEBUG")) or argv[:1] == ["--debug"]
    argv = argv[1:] if argv[:1] == ["--debug"] else argv
    from stages.memory import keep_freed_memory
    from stages.terminal import quiet_library_notices

    quiet_library_notices()
    keep_freed_memory()
    if threading_is_main():
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        return run(argv)
    except user_errors() as error:
        if debug:
            raise
        from stages.train.base import TrainingStopped

        print(f"qformer {command_name(argv)}: error: {describe(error)}", file=sys.stderr)
        return 1 if isinstance(error, TrainingStopped) else 2
    except KeyboardInterrupt:
        print("qformer: interrupted", file=sys.stderr)
        return 130


def run(argv: list[str]) -> int:
    """Parse `argv` and run its command; argparse's own exits (--help, a reported mistake) return their status."""
    if argv[:1] and argv[0] in TRAINING:
        from stages.train.lightning_cli import run_training
        from stages.train.resume import StoppedBySignal

        try:
            stopped_by = run_training(argv[0], argv[1:]).stopped_by_signal()
        except StoppedBySignal as stop:
            return stop.code  # 128 + the signal, as if killed by it, after saving the resume checkpoint
        return 0 if stopped_by is None else 128 + stopped_by
    parser = build_parser(argv)
    try:
        namespace, unknown = parser.parse_known_args(argv)
        if unknown:
            leaf_parser(parser, [namespace.command, getattr(namespace, "task", None)]).unknown(unknown)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    args = vars(namespace)
    function = args.pop("function")
    for key in ("command", "task", "debug"):
        args.pop(key, None)
    return call(function, args)


def command_name(argv: list[str]) -> str:
    """`eval retrieval`, `import lavis`, `stage1`, ...: the words that name the command in `argv`."""
    words = [a for a in argv[:2] if not a.startswith("-")]
    return " ".join(words[:2] if words and isinstance(COMMANDS.get(words[0]), dict) else words[:1])


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
