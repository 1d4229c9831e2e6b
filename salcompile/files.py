"""Reading model files safely and writing outputs atomically.

Formats are told apart by content, never by extension. Nothing is unpickled unless the caller
says `trust_pickle=True` (a full pickle runs code from the file).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict

import torch

from .errors import SalcompileError

PLAN_FILE = "salcompile/plan.json"

EXPORT, STATE_DICT, PICKLE = "torch.export archive", "state_dict", "pickled module"


def _require_file(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise SalcompileError(f"{p}: no such file.")
    if not p.is_file():
        raise SalcompileError(f"{p}: not a regular file.")
    if p.stat().st_size == 0:
        raise SalcompileError(f"{p}: the file is empty.")
    return p


def detect_format(path) -> str:
    """EXPORT, STATE_DICT or PICKLE, from the file's content; SalcompileError otherwise."""
    p = _require_file(path)
    if zipfile.is_zipfile(p):
        try:
            names = zipfile.ZipFile(p).namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise SalcompileError(f"{p}: a damaged zip archive ({exc}).") from exc
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return EXPORT
        if any(n.endswith("/data.pkl") for n in names):
            return STATE_DICT if _is_tensor_dict(p) else PICKLE
        raise SalcompileError(f"{p}: a zip archive, but neither a torch.export archive nor a "
                              "torch.save file.")
    with open(p, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # pickle protocol marker: legacy torch.save or plain pickle
        return PICKLE
    raise SalcompileError(f"{p}: not a model file salcompile reads (expected a torch.export archive "
                          "from torch.export.save, or a torch.save'd state_dict).")


def _is_tensor_dict(p: Path) -> bool:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return False  # refused by the weights-only unpickler: it holds code objects
    except Exception as exc:
        raise SalcompileError(f"{p}: cannot be read as a torch.save file ({exc}).") from exc
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_state_dict(path) -> Dict[str, torch.Tensor]:
    return torch.load(_require_file(path), map_location="cpu", weights_only=True)


def load_pickled_module(path, trust_pickle: bool) -> torch.nn.Module:
    if not trust_pickle:
        raise SalcompileError(
            f"{path} is a fully pickled object: loading it runs code stored in the file. "
            "Refusing. If you trust its source, pass --trust-pickle (trust_pickle=True); better, "
            "save a state_dict or a torch.export archive.")
    obj = torch.load(_require_file(path), map_location="cpu", weights_only=False)
    if not isinstance(obj, torch.nn.Module):
        raise SalcompileError(f"{path}: the pickle holds a {type(obj).__name__}, not an nn.Module.")
    return obj


def load_export(path, extra_files=None) -> torch.export.ExportedProgram:
    p = _require_file(path)
    try:
        return torch.export.load(str(p), extra_files=extra_files)
    except Exception as exc:
        raise SalcompileError(f"{p}: not a readable torch.export archive ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}). Was it truncated? "
                              "Re-create it with torch.export.save.") from exc


def module_from_export(ep: torch.export.ExportedProgram,
                       keep_guards: bool = False) -> torch.nn.Module:
    """A trainable module from an exported program. Without `keep_guards`, the input-shape guards
    of that export are dropped (a later transform() exports again and derives its own); with it,
    a call outside the captured shapes fails at the guard (SALModule turns that into a
    SalcompileError naming the dimension) instead of deep inside the graph."""
    import torch.fx as fx
    unlifted = ep.module()
    gm = fx.GraphModule(unlifted, unlifted.graph)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users \
                and not keep_guards:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def read_plan_text(path) -> str:
    """The plan salcompile embedded in an archive it wrote ('' for other archives)."""
    extra = {PLAN_FILE: ""}
    load_export(path, extra_files=extra)
    return extra[PLAN_FILE]


def check_output(path, force: bool) -> Path:
    p = Path(path)
    if p.exists() and not force:
        raise SalcompileError(f"{p} exists; pass --force to overwrite it.")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SalcompileError(f"cannot write {p}: directory {parent} does not exist.")
    if not os.access(parent, os.W_OK):
        raise SalcompileError(f"cannot write {p}: directory {parent} is not writable.")
    return p


def atomic_write(path, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) and rename tmp to `path`: readers never see a half-written file."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=f".tmp{p.suffix}", dir=p.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_output_dir(path) -> Path:
    """A directory results can be written into: created if missing, refused if not writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SalcompileError(f"{p} exists and is not a directory.")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SalcompileError(f"cannot create output directory {p}: {exc.strerror}.") from exc
    if not os.access(p, os.W_OK):
        raise SalcompileError(f"cannot write into {p}: not writable.")
    return p
