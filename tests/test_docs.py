"""Every link, command, option and module path in README.md, CONTRIBUTING.md and docs/*.md works.

* links: a relative link names a file that exists, and its `#anchor` a heading of that file (GitHub's slugs);
* commands: every `qformer ...` line of a fenced code block or an inline code span names a command that exists, and
  each `--option` on it appears in that command's `--help` (built in-process: `stages.cli.build_parser`, and
  LightningCLI's help for `stage1|stage2 fit|validate`); an inline `--option` on its own must be an option of some
  command (or of a named outside tool);
* paths: a `qformer/...`, `stages/...`, `tests/...`, `benchmarks/...`, `configs/...` or `docs/...` path, and a dotted
  `qformer.x` / `stages.x` name in code, exists;
* the cheap commands run for real (`qformer info --config tiny` and the like).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]

# Options of the other programs the docs show (pip, torchrun, img2dataset, pytest, the benchmark scripts, SLURM).
OUTSIDE_OPTIONS = {
    "--no-deps", "--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--url_list", "--input_format",
    "--url_col", "--caption_col", "--output_format", "--output_folder", "--image_size", "--resize_mode", "--rows",
    "--device", "--csv", "--no-csv", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time",
    "--signal", "--requeue", "--job-name", "--upgrade", "--durations", "--no-loadscope-reorder", "--eval-every",
}
# Words that stand for a command in prose ("qformer --debug COMMAND ...").
PLACEHOLDERS = {"COMMAND", "..."}
TASKS = {"eval", "import", "stage1", "stage2"}  # commands whose second word names the task
PATH_ROOTS = ("qformer/", "stages/", "tests/", "benchmarks/", "configs/", "docs/", ".ci/")


# --- reading the docs ------------------------------------------------------------------------------------------------
FENCE = re.compile(r"^(```|~~~)(.*?)\n(.*?)^\1[ \t]*$", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def split_fences(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(the text outside fenced code blocks, [(info string, body) of each block])."""
    blocks = [(m.group(2).strip(), m.group(3)) for m in FENCE.finditer(text)]
    return FENCE.sub("", text), blocks


def code_lines(block: str) -> list[str]:
    """A code block's logical lines: backslash continuations joined."""
    return block.replace("\\\n", " ").splitlines()


def inline_spans(prose: str) -> list[str]:
    return [span.replace("\\|", "|") for span in INLINE.findall(prose)]


# --- links and anchors ---------------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose, re.MULTILINE):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def link_errors(doc: Path) -> list[str]:
    prose, _ = split_fences(doc.read_text())
    prose = INLINE.sub("", prose)
    errors = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            errors.append(f"{doc.name}: link to a missing file: {target}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            errors.append(f"{doc.name}: link to a missing anchor: {target}")
    return errors


# --- commands and their options --------------------------------------------------------------------------------------
@functools.cache
def command_options() -> dict[tuple[str, ...], set[str]]:
    """Every command's words -> the options its --help lists, built in-process."""
    from stages.cli import COMMANDS, TRAINING, build_parser, leaf_parser

    parser = build_parser(["--help"])
    options: dict[tuple[str, ...], set[str]] = {}
    for name, target in COMMANDS.items():
        if isinstance(target, dict):  # `qformer eval --help`
            options[(name,)] = {o for action in leaf_parser(parser, [name])._actions for o in action.option_strings}
        for task in (target if isinstance(target, dict) else [None]):
            words = (name, task) if task else (name,)
            leaf = leaf_parser(parser, list(words))
            options[words] = {o for action in leaf._actions for o in action.option_strings}
    for stage in TRAINING:
        for task in ("fit", "validate"):
            options[(stage, task)] = training_options(stage, task)
    options[()] = {o for action in parser._actions for o in action.option_strings}
    return options


def training_options(stage: str, task: str) -> set[str]:
    from stages.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([stage, task, "--help"])
    return set(re.findall(r"--[\w.]+", out.getvalue())) | {"-h", "--help"}


def qformer_words(line: str) -> list[str] | None:
    """The words after `qformer` (or `-m stages.cli`) on a line of code, or None when it runs no qformer command."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    for i, word in enumerate(words):
        if word == "qformer" and (i == 0 or words[i - 1] in ("srun", "&&", ";", "time")):
            return words[i + 1:]
        if word == "stages.cli" and i > 0 and words[i - 1] == "-m":
            return words[i + 1:]
    return None


def command_errors(words: list[str], where: str) -> list[str]:
    """What is wrong with `qformer WORDS`: an unknown command, or an option its --help does not list."""
    options = command_options()
    words = [w for w in words if w != "--debug"]
    if not words or words[0].startswith("-"):
        return [f"{where}: option not in `qformer --help`: {w}" for w in words if w.startswith("--") and w not in options[()]]
    if words[0] in PLACEHOLDERS or words[0].endswith(":"):  # `qformer COMMAND ...`, `qformer export: error: ...`
        return []
    names = [words[0].split("|")]
    if len(words) > 1 and not words[1].startswith("-") and any(name in TASKS for name in names[0]):
        names.append(words[1].split("|") if len(words) > 1 else [""])
    candidates = [tuple(n for n in (first, second) if n) for first in names[0] for second in (names[1] if len(names) > 1 else [""])]
    missing = [c for c in candidates if c not in options]
    if missing:
        return [f"{where}: no such command: qformer {' '.join(missing[0])}"]
    errors = []
    for word in words[len(candidates[0]):]:
        for option in re.findall(r"(?:^|[\[|(])(--[a-zA-Z][\w.-]*)", word):
            for command in candidates:
                if option not in options[command] and not option.endswith("."):  # `--model.*` means any of them
                    errors.append(f"{where}: `qformer {' '.join(command)}` has no option {option}")
    return errors


def doc_commands(text: str) -> list[list[str]]:
    """The qformer command lines of a document: code block lines and inline spans."""
    prose, blocks = split_fences(text)
    lines = [line for info, body in blocks if info in ("", "bash", "sh", "shell", "console") for line in code_lines(body)]
    lines += [span for span in inline_spans(prose) if span.startswith(("qformer ", "python -m stages.cli ", "torchrun "))]
    return [words for words in map(qformer_words, lines) if words is not None]


def doc_option_errors(text: str, name: str) -> list[str]:
    errors = []
    for words in doc_commands(text):
        errors += command_errors(words, name)
    prose, _ = split_fences(text)
    known = set().union(*command_options().values()) | OUTSIDE_OPTIONS
    for span in inline_spans(prose):
        for option in re.findall(r"^(--[a-zA-Z][\w.-]*[\w])", span):
            if option not in known and not span.startswith(("qformer", "python", "torchrun")):
                errors.append(f"{name}: `{span}`: no command has the option {option}")
    return errors


# --- paths and dotted names ------------------------------------------------------------------------------------------
def expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if not match:
        return [path]
    return [p for part in match.group(1).split(",") for p in expand_braces(path[:match.start()] + part + path[match.end():])]


def path_errors(text: str, name: str) -> list[str]:
    prose, blocks = split_fences(text)
    spans = inline_spans(prose) + [line for info, body in blocks if info == "python" for line in body.splitlines()]
    errors = []
    for span in spans:
        for path in re.findall(r"(?<![\w/.])((?:" + "|".join(map(re.escape, PATH_ROOTS)) + r")[\w/.{},-]*[\w}/])", span):
            for each in expand_braces(path.split("::")[0]):
                if "*" not in each and not (ROOT / each).exists():
                    errors.append(f"{name}: `{span}` names a missing path: {each}")
        for dotted in re.findall(r"(?<![\w/.])((?:qformer|stages)(?:\.\w+)+)", span):
            if not resolves(dotted):
                errors.append(f"{name}: `{span}`: {dotted} does not exist")
    return errors


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


# --- the tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_and_anchors_resolve(doc):
    assert link_errors(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_commands_and_options_exist(doc):
    assert doc_option_errors(doc.read_text(), doc.name) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_paths_and_modules_exist(doc):
    assert path_errors(doc.read_text(), doc.name) == []


def test_the_checks_catch_a_wrong_option_command_path_and_anchor(tmp_path):
    text = ("```bash\nqformer eval retrieval --model m --data d --k-tset 16\nqformer evaluate --model m\n```\n"
            "Run `qformer search --index i --top 5`; see `stages/evaluate.py`, `qformer.export.load_stage1`"
            " and `--data.max_lenght`.\n")
    errors = doc_option_errors(text, "x.md") + path_errors(text, "x.md")
    assert any("has no option --k-tset" in e for e in errors)
    assert any("no such command: qformer evaluate" in e for e in errors)
    assert any("has no option --top" in e for e in errors)
    assert any("--data.max_lenght" in e for e in errors)
    assert any("stages/evaluate.py" in e for e in errors)
    assert any("qformer.export.load_stage1" in e for e in errors)
    (tmp_path / "a.md").write_text("# A title\n[ok](#a-title) [bad](#b-title) [gone](b.md)\n")
    assert link_errors(tmp_path / "a.md") == ["a.md: link to a missing anchor: #b-title", "a.md: link to a missing file: b.md"]


def test_readme_starts_with_the_install_and_test_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2:6] == ["```bash", 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && qformer demo',
                          "pytest -q", "```"]
    assert len(lines) <= 260


CHEAP = [["info", "--config", "tiny"], ["--help"], ["eval", "--help"]]


@pytest.mark.parametrize("argv", CHEAP, ids=" ".join)
def test_cheap_documented_commands_run(argv, capsys):
    documented = [w for doc in DOCS for w in doc_commands(doc.read_text())]
    assert argv in documented, f"`qformer {' '.join(argv)}` is no longer in the docs: update CHEAP"
    from stages.cli import main

    try:
        status = main(list(argv))
    except SystemExit as exit:  # argparse's --help
        status = exit.code
    assert status in (0, None)
    assert capsys.readouterr().out.strip()


def test_benchmarks_csv_keeps_one_shape_and_the_scripts_append_to_it(tmp_path):
    import csv
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import CSV_COLUMNS, RESULTS_CSV, append_results

    with open(RESULTS_CSV, newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == CSV_COLUMNS and rows[1:] and all(len(row) == len(CSV_COLUMNS) for row in rows)
    out = tmp_path / "results.csv"
    append_results([{"row": "a step", "reference": "10", "this": "5", "unit": "ms", "speedup": "2.00"}], "cpu", "cmd", out)
    append_results([{"row": "another", "reference": "1", "this": "1", "unit": "ms"}], "cpu", "cmd", out)
    with open(out, newline="") as file:
        written = list(csv.DictReader(file))
    assert [r["row"] for r in written] == ["a step", "another"] and written[0]["speedup"] == "2.00"
    assert written[0]["date"] and written[0]["machine"] == "cpu" and written[1]["note"] == ""
