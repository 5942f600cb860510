"""The command layer: no import cycle, the model library apart, and a user's mistake answered in one line."""

import ast
import json
from pathlib import Path

import pytest
import torch

from qformer.bert import load_tokenizer
from qformer.config import LanguageModelConfig, preset
from qformer.folders import save_stage1, save_stage2
from qformer.language_model import load_lm_tokenizer
from qformer.stage1 import Stage1Model
from qformer.stage2 import Stage2Model
from stages.cli import COMMANDS, main
from stages.data.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIG1 = str(ROOT / "configs" / "stage1" / "tiny.yaml")
CONFIG2 = str(ROOT / "configs" / "stage2" / "tiny.yaml")


# --- layout -----------------------------------------------------------------------------------------------------
def imports_of(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found |= {n for n in names if n.split(".")[0] in ("qformer", "stages")}
    return found


def module_graph() -> dict[str, set[str]]:
    graph = {}
    for package in ("qformer", "stages"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            graph[name] = imports_of(path)
    return {m: {i for i in imports if i in graph} for m, imports in graph.items()}


def test_no_module_imports_itself_back():
    graph = module_graph()

    def reaches(start: str, target: str, seen: set) -> bool:
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and (seen.add(nxt) or reaches(nxt, target, seen))):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert not cycles, f"import cycles through {cycles}"


def test_the_model_library_never_imports_the_training_layer():
    graph = module_graph()
    assert all(not i.startswith("stages") for m, imports in graph.items() if m.startswith("qformer") for i in imports)
    for path in (ROOT / "qformer").rglob("*.py"):
        assert "lightning" not in path.read_text(), path


def test_data_and_inference_never_import_training():
    """Rooms by purpose: data is below training; the apps and evaluations run without the training room."""
    graph = module_graph()
    for room in ("stages.data", "stages.apps", "stages.eval"):
        for module, imports in graph.items():
            if module.startswith(room):
                assert not [i for i in imports if i.startswith("stages.train")], module


def test_every_command_is_a_documented_function():
    import argparse

    from stages.cli import _function, add_function

    targets = [t for t in COMMANDS.values() if isinstance(t, str)] + [t for g in COMMANDS.values() if isinstance(g, dict) for t in g.values()]
    for target in targets:
        parser = argparse.ArgumentParser()
        add_function(parser, _function(target))
        assert parser.description, target
        undocumented = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._HelpAction)]
        assert not undocumented, (target, undocumented)
        assert "--" in parser.format_help()  # --help renders (a bare % in a docstring once broke it)


# --- one line per mistake ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("commands_data")
    make_dataset(folder, num_images=40, seed=1)
    return folder


@pytest.fixture(scope="module")
def exports(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("commands_exports")
    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    save_stage1(Stage1Model(config), tokenizer, root / "stage1")
    lm = LanguageModelConfig(config=dict(model_type="opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                         num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64),
                             tokenizer=str(data / "lm_tokenizer_decoder"), precision="fp32", eos_text="</s>")
    config.language_model = lm
    save_stage2(Stage2Model(config), load_lm_tokenizer(lm), root / "stage2")
    return root


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("qformer")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def fit(stage: str, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    config = CONFIG1 if stage == "stage1" else CONFIG2
    return [stage, "fit", "--config", config, "--data.train", str(data / "train.json"), "--data.val", "null",
            "--data.image_root", str(data), "--data.batch_size", "8", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "runs"), *extra]


@pytest.mark.parametrize("extra, expected", [
    (["--model.val_retrieval", "foo"], "model.val_retrieval must be itc, itm or off, got 'foo'"),
    (["--model.config", "tinyy"], "model.config: 'tinyy' is neither a preset (tiny, vitg, vitl) nor a model config file"),
    (["--trainer.accelerator", "gpu"], "(check the --trainer.* options)"),
    (["--trainer.max_stpes", "3"], "unrecognized arguments: --trainer.max_stpes 3 (did you mean --trainer.max_steps?)"),
])
def test_stage1_fit_mistakes(data, tmp_path, capsys, extra, expected):
    if extra[0] == "--trainer.accelerator" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = one_line_error(capsys, fit("stage1", data, tmp_path, "--model.tokenizer", str(data), *extra))
    assert line.startswith("qformer stage1: error:") and expected in line


def test_unknown_field_in_a_model_config(data, tmp_path, capsys):
    config = preset("tiny").to_dict()
    config["qformer_config"]["hidden_sise"] = 32
    (tmp_path / "model.json").write_text(json.dumps(config))
    line = one_line_error(capsys, fit("stage1", data, tmp_path, "--model.tokenizer", str(data), "--model.config", str(tmp_path / "model.json")))
    assert "hidden_sise" in line and "model.json" in line


def test_stage2_fit_with_a_wrong_stage1_folder(data, exports, tmp_path, capsys):
    tokenizer = ["--model.lm_tokenizer", str(data / "lm_tokenizer_decoder")]
    line = one_line_error(capsys, fit("stage2", data, tmp_path, "--model.stage1", str(tmp_path / "nowhere"), *tokenizer))
    assert "is not a qformer export folder" in line
    line = one_line_error(capsys, fit("stage2", data, tmp_path, "--model.stage1", str(exports / "stage2"), *tokenizer))
    assert "is not a stage-1 export" in line


def test_lm_path_on_the_command_line_replaces_the_config_files_lm_config(data, exports, tmp_path, capsys):
    lm = tmp_path / "lm"
    from transformers import AutoModelForCausalLM, OPTConfig

    AutoModelForCausalLM.from_config(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                               word_embed_proj_dim=32, max_position_embeddings=64)).save_pretrained(str(lm))
    argv = fit("stage2", data, tmp_path, "--model.stage1", str(exports / "stage1"), "--model.lm_path", str(lm),
               "--model.lm_tokenizer", str(data / "lm_tokenizer_decoder"), "--model.val_caption", "false")
    assert main(argv) == 0  # configs/stage2/tiny.yaml sets lm_config: the command line wins
    assert (tmp_path / "runs" / "last.ckpt").is_file()  # the predictable place of the newest run's checkpoint
    printed = capsys.readouterr().out
    assert "last checkpoint" in printed and str(tmp_path / "runs" / "last.ckpt") in printed


@pytest.mark.parametrize("argv, expected", [
    (["eval", "retrieval", "--model", "{stage1}", "--data", "{data}/test.json", "--images", "{data}", "--k-tset", "3"],
     "qformer eval retrieval: error: unrecognized arguments: --k-tset 3 (did you mean --k-test?)"),
    (["eval", "retrieval", "--model", "{stage1}", "--data", "{data}/test.json", "--images", "{data}", "--device", "cuda"],
     "qformer eval retrieval: error: --device cuda: no CUDA device is available here (use --device cpu)"),
    (["export", "{data}/test.json", "--out", "{tmp}/x"], "qformer export: error: cannot read"),
    (["caption", "--model", "{stage1}", "{data}/images"], "qformer caption: error: {stage1} holds a stage-1 model, not stage 2"),
    (["info", "--config", "{data}"], "is not a qformer export folder"),
])
def test_command_mistakes(data, exports, tmp_path, capsys, argv, expected):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    values = {"data": str(data), "stage1": str(exports / "stage1"), "tmp": str(tmp_path)}
    line = one_line_error(capsys, [a.format(**values) for a in argv])
    assert expected.format(**values) in line


def test_a_wrong_image_folder_is_summarised_not_listed(data, exports, tmp_path, capsys):
    capsys.readouterr()
    (tmp_path / "elsewhere").mkdir()
    assert main(["eval", "retrieval", "--model", str(exports / "stage1"), "--data", str(data / "train.json"),
                 "--images", str(tmp_path / "elsewhere"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 22 and err[-2].startswith("... and ") and err[-1].startswith("qformer eval retrieval: error: no readable image")


def test_info_reads_an_export_folder_and_counts_stage2(exports, capsys):
    capsys.readouterr()
    assert main(["info", "--config", str(exports / "stage2")]) == 0
    out = capsys.readouterr().out
    assert "stage-1 parameters" in out and "stage-2 parameters" in out and "language model" in out


def test_debug_shows_the_traceback(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a qformer export folder"):
        main(["--debug", "info", "--config", str(data)])


def test_a_command_line_parses_back_to_its_values():
    """What a folder records as the command that made it (`command_line`) runs the same function with the same values."""
    import shlex

    from stages.cli import build_parser, command_line
    from stages.tools.cache_features import cache_features

    values = {"config": "tiny", "vision_weights": None, "data": ["a b.json", "c.json"], "images": "/x y", "out": "o", "views": 2,
              "dtype": "bf16", "batch_size": 64, "seed": 3, "device": "cpu", "hflip": False, "crop_scale": [0.5, 0.9],
              "overwrite": False, "max_image_pixels": 10, "allow_outside_root": True}
    line = command_line("cache-features", cache_features, values)
    assert line.startswith("qformer cache-features ") and "--batch-size" not in line and "--vision-weights" not in line
    words = shlex.split(line)[1:]
    parsed = vars(build_parser(words).parse_args(words))
    assert {k: parsed[k] for k in values} == {**values, "crop_scale": [0.5, 0.9]}
