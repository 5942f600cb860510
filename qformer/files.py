"""Model files on disk: folders that appear whole or not at all, and reads whose errors name the file.

* `atomic_folder(out, overwrite)`: a command writes into a hidden sibling `.NAME.partial-XXXXXXXX`, which is renamed
  into place at the end. On any exception (a SIGTERM too, when the command turns it into one) the partial folder is
  removed and `out` is left as it was. A SIGKILL cannot be cleaned up: a leftover `.NAME.partial-*` folder is safe
  to delete.
* `read_safetensors`, `read_torch`, `read_tokenizer`, `read_gguf`: a missing package, a truncated, empty or foreign file gives a one-line
  ValueError / FileNotFoundError naming it, not a library traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

MARKER = "qformer_export.json"  # written last: a folder without it is not (yet) an export


# --- writing ------------------------------------------------------------------------------------------------
def check_out(out: str | Path, overwrite: bool) -> Path:
    """`out` may be new or an empty folder; a non-empty one only with `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} already exists and is not empty: give --overwrite to replace it")
    return out


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it becomes `out`.

    An existing `out` with files (allowed with `overwrite`) is replaced as a whole; an empty one is kept and filled.
    """
    out = Path(os.path.abspath(check_out(out, overwrite)))  # "." or "a/.." have no usable name and parent
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield partial
        _normal_permissions(partial)
        _move_into_place(partial, check_out(out, overwrite))  # checked again: `out` may have filled up meanwhile
    except BaseException:  # KeyboardInterrupt and SystemExit (SIGTERM) as well
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _move_into_place(partial: Path, out: Path) -> None:
    """Rename `partial` to `out`; an existing `out` is moved aside first and deleted once the new one is in."""
    if not out.exists():
        partial.rename(out)
        return
    if not any(out.iterdir()):
        # An empty folder the user made (perhaps a mount point, or the working directory) stays: it is filled
        # instead, the marker last. shutil.move copies where a rename cannot cross file systems.
        for entry in sorted(partial.iterdir(), key=lambda p: p.name == MARKER):
            shutil.move(entry, out / entry.name)
        partial.rmdir()
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(old / out.name)
    try:
        partial.rename(out)
    except BaseException:
        (old / out.name).rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(folder: Path) -> None:
    """What a plain `open()` / `mkdir()` would have given: mkdtemp makes 0700 and safetensors' writer 0600."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_safetensors(state: dict[str, Tensor], path: Path) -> Path:
    """safetensors' `save_file` with the permissions any other file gets (its temp-file writer leaves 0600)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    path.chmod(0o666 & ~_umask())
    return path


# --- checking weights ------------------------------------------------------------------------------------
def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict (sorted keys; each name, dtype, shape and bytes), as loaded.

    Call it before the encoder first runs: precision "auto" casts the weights to fp16 on the first CUDA forward.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # reshape: a scalar (temp) too
    return digest.hexdigest()


def non_finite(state: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def shape_mismatches(model_state: dict[str, Tensor], state: dict[str, Tensor]) -> list[str]:
    """`key: shape in the file vs the model` for each tensor that would not fit (load_state_dict raises a traceback)."""
    return [f"{k} {tuple(v.shape)} vs the model's {tuple(model_state[k].shape)}"
            for k, v in state.items() if k in model_state and v.shape != model_state[k].shape]


# --- reading ------------------------------------------------------------------------------------------------
def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """All tensors of a .safetensors file; a missing, truncated or foreign file is named in the error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=device)
    except SafetensorError as error:
        raise ValueError(f"cannot read {path}: {error} (a truncated or empty file, or not safetensors)") from error


# torch's refusal names what the pickle needs: "Unsupported global: GLOBAL __main__.Foo was not an allowed global",
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" or "Unsupported operand 149".
_BLOCKED = re.compile(r"GLOBAL ([\w.]+)|(Unsupported operand \S+)")


def read_torch(path: str | Path) -> object:
    """A torch file loaded weights-only: tensors and plain containers, never pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": noise before the error below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _torch_read_error(path, error) from error


def unpickling_refusal(error: BaseException) -> str | None:
    """What torch's weights-only loader refused, in words (None for any other error); never its `weights_only=False` advice."""
    if not (isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)):
        return None
    match = _BLOCKED.search(str(error))
    blocked = ("GLOBAL " + match.group(1) if match.group(1) else match.group(2)) if match else "an object that is not a tensor"
    return f"refused to unpickle {blocked} (only tensors and plain containers are loaded, weights-only; pickled code is never run)"


def _torch_read_error(path: Path, error: Exception) -> ValueError:
    """One line naming the file and what was wrong, without torch's advice to load with `weights_only=False`."""
    refusal = unpickling_refusal(error)
    if refusal:
        return ValueError(f"cannot read {path}: {refusal}")
    if path.stat().st_size == 0:
        return ValueError(f"cannot read {path}: the file is empty")
    return ValueError(f"cannot read {path} as a torch checkpoint (truncated, or not a torch file): {_first_line(error)}")


def read_tokenizer(folder: str | Path, load: Callable[[str], object]) -> object:
    """`load(folder)` (a transformers `from_pretrained`), with a broken tokenizer file named in one line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.is_file():
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:  # an empty file says "Expecting value: line 1 column 1"
                raise ValueError(f"{file} is not valid JSON ({_first_line(error)}): an empty or damaged tokenizer file") from error
    try:
        return load(str(folder))
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ... for a folder it cannot read
        raise ValueError(f"cannot load the tokenizer in {folder}: {_first_line(error)}") from error


# --- GGUF (llama.cpp's single-file format; transformers dequantises it to fp32 on load) ---------------------
GGUF_MAGIC = b"GGUF"
GGUF_PACKAGES = ("gguf", "accelerate")  # what transformers needs to read one; the qformer[llm] extra brings them
GGUF_INSTALL_HINT = "pip install gguf accelerate (or the [llm] extra: pip install -e '.[llm]')"


def check_gguf(path: str | Path) -> Path:
    """A file transformers can read as GGUF: it exists, starts with the GGUF magic, and the packages are installed.

    Checked before transformers sees the file: its own errors for these cases are tracebacks from deep inside.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as file:
        if file.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'): a damaged or other file")
    missing = [name for name in GGUF_PACKAGES if not _importable(name)]
    if missing:
        raise ValueError(f"{path}: reading a GGUF file needs the {' and '.join(missing)} package(s): {GGUF_INSTALL_HINT}")
    return path


def read_gguf(path: str | Path, load: Callable[[], object]) -> object:
    """`load()` (a transformers `from_pretrained(..., gguf_file=...)`) of a checked file, a damaged one named in one line."""
    path = check_gguf(path)
    try:
        with _gguf_parsed_once():
            return load()
    except Exception as error:  # the gguf reader raises ValueError, KeyError, IndexError, struct.error, ... for a broken file
        raise ValueError(f"cannot read {path} as a GGUF model (truncated or damaged?): {_first_line(error)}") from error


_GGUF_READERS: dict[tuple, object] = {}  # (path, size, mtime) -> a parsed gguf.GGUFReader (read-only memory maps)


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While transformers loads from a GGUF file, parse the file once per process and build each name map once.

    transformers parses the whole file for the config, again for the model and again for the tokenizer (SmolLM2's
    49k-word vocabulary: ~5 s a parse on 2 cores), and builds gguf's tensor-name table once per module of the model
    (~8 s for a 30-layer LM). Both are pure functions of their arguments, and transformers imports them from `gguf`
    when it needs them, so they are swapped for cached versions only for the load: SmolLM2's 36 s become ~15 s.
    """
    import functools

    import gguf

    plain_reader, plain_name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def cached_reader(path, mode="r"):
        if mode != "r":
            return plain_reader(path, mode)
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if key not in _GGUF_READERS:
            _GGUF_READERS.clear()  # keep one file's maps open, not every file ever read
            _GGUF_READERS[key] = plain_reader(path, mode)
        return _GGUF_READERS[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=8)(plain_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = plain_reader, plain_name_map


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
