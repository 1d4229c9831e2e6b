"""Reading model files safely and writing outputs atomically.

Formats are told apart by content, never by extension. Nothing is unpickled unless the caller
says `trust_pickle=True` (a full pickle runs code from the file).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .errors import SalcompileError
from .validate import flag, path_arg

PLAN_FILE = "salcompile/plan.json"
CHECKSUM_FILE = "salcompile/checksum.json"   # sha256 of every other member of the archive

EXPORT, STATE_DICT, PICKLE = "torch.export archive", "state_dict", "pickled module"


def _require_file(path) -> Path:
    p = path_arg("path", path)
    if not p.exists():
        raise SalcompileError(f"{p}: no such file; check the path (relative paths start from "
                              f"{os.getcwd()}).")
    if p.is_dir():
        raise SalcompileError(f"{p} is a directory; pass the path of a model file inside it.")
    if not p.is_file():
        raise SalcompileError(f"{p}: not a regular file (a device, pipe or socket); pass the path "
                              "of a model file written by torch.save or torch.export.save.")
    if p.stat().st_size == 0:
        raise SalcompileError(f"{p}: the file is empty; was its write interrupted? Write it again.")
    if not os.access(p, os.R_OK):
        raise SalcompileError(f"{p}: not readable (permissions); fix them or copy the file.")
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
        return STATE_DICT if _is_tensor_dict(p) else PICKLE
    raise SalcompileError(f"{p}: not a model file salcompile reads (expected a torch.export archive "
                          "from torch.export.save, or a torch.save'd state_dict).")


# where training checkpoints keep the model's weights: {"model": state_dict, "epoch": 3, ...}
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def _weights_of(obj):
    """The state_dict inside what torch.load(weights_only=True) gave, or None."""
    def tensors(d):
        return isinstance(d, dict) and d and all(isinstance(v, torch.Tensor) for v in d.values())
    if tensors(obj):
        return obj
    if isinstance(obj, dict):
        for key in CHECKPOINT_KEYS:
            if tensors(obj.get(key)):
                return obj[key]
    return None


def _is_tensor_dict(p: Path) -> bool:
    """A state_dict, or a checkpoint dict holding one (zip or legacy torch.save format)."""
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return False  # refused by the weights-only unpickler: it holds code objects
    except Exception as exc:
        raise SalcompileError(f"{p}: cannot be read as a torch.save file ({exc}); save it "
                              "again with torch.save(model.state_dict(), path).") from exc
    return _weights_of(obj) is not None


def load_state_dict(path) -> Dict[str, torch.Tensor]:
    """The weights in a state_dict file or in a checkpoint dict ({"model": state_dict, ...})."""
    obj = torch.load(_require_file(path), map_location="cpu", weights_only=True)
    weights = _weights_of(obj)
    if weights is None:
        raise SalcompileError(f"{path}: holds no state_dict (a dict of tensors, or one under "
                              f"{', '.join(repr(k) for k in CHECKPOINT_KEYS)}); save one with "
                              "torch.save(model.state_dict(), path).")
    return weights


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
    """Load a torch.export archive; one salcompile wrote is checked against its checksum first
    (`extra_files`, if given, also receives CHECKSUM_FILE: '' when the archive has none)."""
    p = _require_file(path)
    digest = verify_checksum(p)
    try:
        with _quiet_torch_logs():
            ep = torch.export.load(str(p), extra_files=extra_files)
        if extra_files is not None:
            extra_files[CHECKSUM_FILE] = digest or ""
        return ep
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


# Paths check_output was told not to overwrite: atomic_write checks again under its lock (another
# process may have written the file since).
_NO_OVERWRITE: set = set()
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def check_output(path, force: bool) -> Path:
    """A file path an output can be written to (checked before any expensive work)."""
    p = path_arg("path", path)
    flag("force", force)
    if p.is_dir():
        raise SalcompileError(f"{p} is a directory; give a file name, e.g. {p / ('model' + '.pt2')}"
                              " (--force never replaces a directory).")
    if p.exists() and not force:
        raise SalcompileError(f"{p} exists; pass --force (force=True) to overwrite it, or choose "
                              "another name.")
    if p.exists() and not p.is_file():
        raise SalcompileError(f"{p} exists and is not a regular file (a device, pipe or socket); "
                              "choose a file path.")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SalcompileError(f"cannot write {p}: directory {parent} does not exist; create it "
                              "first (mkdir -p) or choose another path.")
    if not os.access(parent, os.W_OK):
        raise SalcompileError(f"cannot write {p}: directory {parent} is not writable; choose a "
                              "directory you can write to.")
    try:  # what access() cannot tell: a read-only or virtual file system (/proc), quotas
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=f".tmp{p.suffix}", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SalcompileError(f"cannot write {p}: creating a file in {parent} fails "
                              f"({exc.strerror or exc}); choose a directory on a writable disk."
                              ) from exc
    key = str(p.resolve())
    (_NO_OVERWRITE.discard if force else _NO_OVERWRITE.add)(key)
    return p


def _tmp_pattern(p: Path) -> "re.Pattern":
    """The names atomic_write gives its temporary files for `p` (tempfile's 8 random chars)."""
    return re.compile(rf"^\.{re.escape(p.name)}\.[A-Za-z0-9_]{{8}}\.tmp{re.escape(p.suffix)}$")


def _clean_stale_temps(p: Path) -> None:
    """Remove the temporary files an interrupted write to `p` (kill -9, power loss) left behind.
    Called with the lock on `p` held, so none of them belongs to a live salcompile writer."""
    parent = p.parent if str(p.parent) else Path(".")
    pattern = _tmp_pattern(p)
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    size = entry.stat(follow_symlinks=False).st_size
                    os.unlink(entry.path)
                    removed.append(f"{entry.name} ({size:,} bytes)")
    if removed:
        warnings.warn(f"salcompile: removed {len(removed)} stale temporary file(s) an interrupted "
                      f"write to {p} left behind: {', '.join(removed)}.", stacklevel=4)


def lock_path(p: Path) -> Path:
    return (p.parent if str(p.parent) else Path(".")) / f".{p.name}.lock"


@contextlib.contextmanager
def output_lock(path):
    """An exclusive lock on output `path` (fcntl.flock on `.<name>.lock` beside it), refused at
    once when another process holds it. The lock file is removed on release (a crashed holder
    leaves an empty, unlocked one: harmless, reused and removed by the next writer)."""
    p = Path(path)
    lp = lock_path(p)
    for _ in range(20):
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SalcompileError(f"cannot write {p}: cannot create its lock file {lp} "
                                  f"({exc.strerror}); choose a writable directory.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SalcompileError(
                f"another process is writing {p} right now (it holds {lp}); wait for it to "
                "finish, or write to another path.") from None
        except OSError:
            os.close(fd)  # a file system without flock (some network mounts): write unlocked
            yield
            return
        # The holder before us may have removed the lock file after we opened it: then our
        # lock is on a dead inode, and another writer may lock a new file. Retry on the new one.
        try:
            same = os.stat(lp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:  # pragma: no cover
        raise SalcompileError(f"cannot lock {p}: its lock file {lp} keeps changing; retry.")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lp)
        os.close(fd)


def atomic_write(path, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) and rename tmp to `path`: readers never see a half-written file.

    Holds an exclusive lock on `path` meanwhile (a second writer is refused), removes temporary
    files an interrupted earlier write left (with a warning), and turns OS errors into
    SalcompileErrors saying what to do."""
    p = path_arg("path", path)
    key = str(p.resolve())
    with output_lock(p):
        if key in _NO_OVERWRITE and p.exists():
            raise SalcompileError(f"{p} was created by another process while this one was "
                                  "working; pass --force (force=True) to overwrite it, or choose "
                                  "another name.")
        _clean_stale_temps(p)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=f".tmp{p.suffix}",
                                       dir=p.parent if str(p.parent) else ".")
        except OSError as exc:
            raise SalcompileError(f"cannot write {p}: {exc.strerror or exc}; choose a writable "
                                  "directory.") from exc
        os.close(fd)
        try:
            with contextlib.suppress(OSError):  # mkstemp makes it 0600: give the usual mode
                os.chmod(tmp, 0o666 & ~_UMASK)
            try:
                write(tmp)
                os.replace(tmp, p)
            except IsADirectoryError as exc:
                raise SalcompileError(f"{p} is a directory; give a file name.") from exc
            except OSError as exc:
                raise SalcompileError(
                    f"writing {p} failed: {exc.strerror or exc}"
                    + (" (disk full? free space or write elsewhere)"
                       if exc.errno == errno.ENOSPC else "; check the path and free space")
                    + ".") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _NO_OVERWRITE.discard(key)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_output_dir(path) -> Path:
    """A directory results can be written into: created if missing, refused if not writable."""
    p = path_arg("out_dir", path)
    if p.exists() and not p.is_dir():
        raise SalcompileError(f"{p} exists and is not a directory.")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SalcompileError(f"cannot create output directory {p}: {exc.strerror}.") from exc
    if not os.access(p, os.W_OK):
        raise SalcompileError(f"cannot write into {p}: not writable.")
    return p


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch logs a full traceback (logging, not an exception) for some archive and export
    failures we turn into SalcompileErrors: silence its loggers for the call we wrap."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.export", "torch._export",
                                              "torch._dynamo", "torch.fx.experimental")]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, before):
            lg.setLevel(lv)


def _members_digest(z: zipfile.ZipFile) -> Tuple[str, str, Optional[str]]:
    """(archive prefix, sha256 over every member but the checksum, the stored checksum or None).
    Members are hashed by name (below the archive's top folder) and content, in name order."""
    names = z.namelist()
    prefix = names[0].split("/", 1)[0] if names and "/" in names[0] else ""
    strip = len(prefix) + 1 if prefix else 0
    h = hashlib.sha256()
    stored = None
    for name in sorted(names):
        rel = name[strip:]
        if rel == "extra/" + CHECKSUM_FILE:
            stored = json.loads(z.read(name).decode()).get("sha256")
            continue
        h.update(rel.encode() + b"\0")
        h.update(z.read(name))
    return prefix, h.hexdigest(), stored


def add_checksum(path) -> str:
    """Append CHECKSUM_FILE (the sha256 of the archive's contents) to a torch.export archive."""
    with zipfile.ZipFile(path) as z:
        prefix, digest, _ = _members_digest(z)
    name = (prefix + "/" if prefix else "") + "extra/" + CHECKSUM_FILE
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(name, json.dumps({"sha256": digest, "scheme": "zip-members-v1"}))
    return digest


def verify_checksum(path) -> Optional[str]:
    """The archive's verified sha256, None when it carries no checksum (written before
    salcompile stored one, or by another tool); a SalcompileError when its content changed."""
    p = Path(path)
    if not zipfile.is_zipfile(p):
        return None  # torch.export.load gives the error for what it cannot read
    try:
        with zipfile.ZipFile(p) as z:
            _, digest, stored = _members_digest(z)
    except (zipfile.BadZipFile, zlib_error(), ValueError, KeyError, OSError) as exc:
        if "CRC" in str(exc):
            raise SalcompileError(_damaged(p, f"a stored file fails its CRC check: {exc}")) from exc
        return None  # not readable as zip members: torch.export.load reports it
    if stored is None:
        return None
    if stored != digest:
        raise SalcompileError(_damaged(p, f"its contents hash to sha256 {digest[:16]}…, the "
                                          f"archive recorded {str(stored)[:16]}…"))
    return digest


def zlib_error():
    import zlib
    return zlib.error


def _damaged(p: Path, why: str) -> str:
    return (f"{p}: the archive is damaged: {why}. It changed after salcompile wrote it (a broken "
            "copy or download, or a disk error); copy it again or re-create it with "
            "salcompile.save / salcompile convert.")
