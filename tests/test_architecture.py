"""The house rules of docs/architecture.md: every module is on the map, and inference never imports training."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from stages.data.synthetic import make_dataset

from tiny_models import write_stage1, write_stage2

ROOT = Path(__file__).resolve().parents[1]
TRAINING_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "stages.train", "stages.data.captions")


def mapped_paths(text: str) -> set[str]:
    """The files and folders of the tree in docs/architecture.md (two spaces of indent per level)."""
    block = text.split("## The tree", 1)[1].split("```")[1]
    paths, folders = set(), []
    for line in block.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match:
            continue
        depth, name = len(match[1]) // 2, match[2]
        folders = folders[:depth]
        path = "/".join(folders + [name.rstrip("/")])
        paths.add(path)
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
    return paths


def test_every_module_is_on_the_map_and_the_map_has_nothing_else():
    mapped = mapped_paths((ROOT / "docs" / "architecture.md").read_text())
    modules = {str(p.relative_to(ROOT)) for package in ("qformer", "stages") for p in (ROOT / package).rglob("*.py")}
    folders = {str(Path(m).parent) for m in modules}
    assert not modules - mapped, f"modules missing from docs/architecture.md: {sorted(modules - mapped)}"
    assert not mapped - modules - folders, f"docs/architecture.md lists what does not exist: {sorted(mapped - modules - folders)}"


def test_the_map_parser_sees_a_missing_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert "stages/apps/search.py" in mapped_paths(text)
    assert "stages/apps/search.py" not in mapped_paths(text.replace("    search.py ", "    searching.py "))


def test_no_module_is_much_over_300_lines_unless_it_is_one_concern():
    allowed = {"qformer/interop/names.py"}  # one table of weight-name maps
    long = {str(p.relative_to(ROOT)): n for package in ("qformer", "stages") for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 330}
    assert not set(long) - allowed, long


INFERENCE = """
import json, sys
import stages.eval.metrics
from stages.cli import main
stages.eval.metrics.java_available = lambda: False  # as the without_java fixture: no JVM start for `eval caption`
stage1, stage2, data, out = sys.argv[1:5]
commands = {
    "caption": ["caption", data + "/images/000000.png", "--model", stage2, "--max-new-tokens", "3", "--min-new-tokens", "0",
                "--num-beams", "1"],
    "ask": ["ask", data + "/images/000000.png", "what color is it?", "--model", stage2, "--max-new-tokens", "3", "--num-beams", "1"],
    "index": ["index", data + "/images", "--model", stage1, "--out", out + "/index"],
    "search": ["search", "a red circle", "--index", out + "/index", "--k", "2"],
    "eval retrieval": ["eval", "retrieval", "--model", stage1, "--data", data + "/test.json", "--images", data, "--k-test", "2",
                       "--no-progress"],
    "eval caption": ["eval", "caption", "--model", stage2, "--data", data + "/test.json", "--images", data, "--max-new-tokens", "3",
                     "--min-new-tokens", "0", "--num-beams", "1", "--no-progress"],
    "eval vqa": ["eval", "vqa", "--model", stage2, "--data", data + "/test_vqa.json", "--images", data, "--max-new-tokens", "3",
                 "--num-beams", "1", "--no-progress"],
}
forbidden = %r
found = {}
for name, argv in commands.items():
    status = main(argv)
    found[name] = [status, sorted(m for m in sys.modules if m.startswith(forbidden))]
import stages.apps.serve  # the page: its module and everything it imports at load
found["serve"] = [0, sorted(m for m in sys.modules if m.startswith(forbidden))]
print("RESULT " + json.dumps(found))
""" % (TRAINING_MODULES,)


def test_inference_commands_never_import_lightning_or_the_training_data(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, num_images=12, seed=0, val_images=2, test_images=2)
    images = data / "images"
    stage1, stage2 = write_stage1(data, tmp_path / "stage1"), write_stage2(data, tmp_path / "stage2")
    done = subprocess.run([sys.executable, "-c", INFERENCE, str(stage1), str(stage2), str(data), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    result = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert result is not None, done.stderr[-3000:]
    found = json.loads(result.removeprefix("RESULT "))
    assert images.is_dir()
    assert {name: status for name, (status, _) in found.items()} == dict.fromkeys(found, 0), done.stderr[-3000:]
    assert {name: modules for name, (_, modules) in found.items() if modules} == {}
