"""Datasets for the labs, offline first.

One function, :func:`load_dataset`, returns any dataset the course uses as tensors plus metadata:

* ``mnist1d`` (default) -- MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D",
  ICML 2024), generated locally by the ``mnist1d`` package from its seed: no download. The default
  arguments give the paper's 4,000 train / 1,000 test split of length-40 signals in 10 classes. The
  result is cached under the data directory as ``.npz`` with a SHA-256 sidecar that is checked on
  every load.
* ``digits`` -- scikit-learn's bundled 8x8 handwritten digits (1,797 images), for image visuals and
  2-D convolutions; always offline.
* ``mnist``, ``fashion_mnist``, ``cifar10`` -- read from the files torchvision downloads (IDX files
  for the MNIST family; for CIFAR-10 the python pickle batches, read by an unpickler that resolves
  numpy arrays and nothing else). They are downloaded into the data directory when the machine is
  online; offline, run ``python -m labsupport.data fetch NAME`` on a machine that is online and
  copy the data directory over.

The data directory is ``$LAB_DATA_DIR`` if set, else ``data/`` in the repository (or
``~/.cache/labsupport`` for a non-editable install).

Every chapter starts here; the partitions of chapter 03 (:mod:`labsupport.partitions`) split these tensors
across clients.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "CorruptCacheError",
    "Dataset",
    "DatasetNotAvailableError",
    "data_dir",
    "fetch",
    "load_dataset",
]

DATASETS: dict[str, str] = {
    "mnist1d": "MNIST-1D, generated locally (Greydanus & Kobak 2024); 40-sample signals, 10 classes",
    "digits": "scikit-learn's bundled 8x8 handwritten digits; 1 x 8 x 8 images, 10 classes",
    "mnist": "MNIST via torchvision (download or `fetch`); 1 x 28 x 28 images, 10 classes",
    "fashion_mnist": "Fashion-MNIST via torchvision (download or `fetch`); 1 x 28 x 28, 10 classes",
    "cifar10": "CIFAR-10 via torchvision (download or `fetch`); 3 x 32 x 32 images, 10 classes",
}

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_CIFAR_FOLDER = "cifar-10-batches-py"


class DatasetNotAvailableError(FileNotFoundError):
    """A downloadable dataset is not on disk and could not be downloaded."""


class CorruptCacheError(ValueError):
    """A cached or downloaded file does not hold what it should."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split as tensors: ``x`` float32, ``y`` int64 class indices."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(40,)`` for MNIST-1D or ``(1, 8, 8)`` for digits."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, classes={self.num_classes})"
        )


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory datasets are cached in (created if missing).

    Order: ``root`` if given, ``$LAB_DATA_DIR``, the repository's ``data/`` (editable install),
    ``~/.cache/labsupport``.
    """
    if root is None:
        root = os.environ.get("LAB_DATA_DIR")
    if root is None:
        repo = Path(__file__).resolve().parents[1]
        root = (
            repo / "data"
            if (repo / "pyproject.toml").exists()
            else Path.home() / ".cache/labsupport"
        )
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_dataset(
    name: str = "mnist1d",
    *,
    root: str | os.PathLike | None = None,
    seed: int = 42,
    num_samples: int = 5000,
    train_split: float = 0.8,
    download: bool = True,
    refresh: bool = False,
) -> Dataset:
    """Load a dataset by name (see :data:`DATASETS`) as float32/int64 tensors.

    ``seed``, ``num_samples`` and ``train_split`` configure the generated MNIST-1D (its defaults are
    the paper's 5,000 samples split 4,000/1,000) and the digits split. ``download`` lets the
    torchvision datasets be fetched when missing; ``refresh`` regenerates a cached MNIST-1D.
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split must be in (0, 1), got {train_split!r}")
    if name == "mnist1d":
        if num_samples < 20:
            raise ValueError(f"num_samples must be at least 20 (2 per class), got {num_samples}")
        ds = _load_mnist1d(data_dir(root), seed, num_samples, train_split, refresh)
    elif name == "digits":
        ds = _load_digits(seed, train_split)
    else:
        folder = data_dir(root)
        if not _is_present(name, folder):
            if not download:
                raise DatasetNotAvailableError(_missing_message(name, folder))
            try:
                fetch(name, folder)
            except Exception as exc:  # offline, proxy, DNS ...: say how to get the files instead
                raise DatasetNotAvailableError(
                    f"{_missing_message(name, folder)}\nThe download failed: {exc}"
                ) from exc
        ds = _load_mnist_family(name, folder) if name in _MNIST_FOLDERS else _load_cifar10(folder)
    _check_shapes(ds)
    return ds


# ----------------------------------------------------------------------------------------- MNIST-1D


def _mnist1d_cache(folder: Path, seed: int, num_samples: int, train_split: float) -> Path:
    """The cache file, keyed exactly by every parameter that changes the data.

    ``repr`` of a float round-trips exactly (``0.8`` and ``0.8000001`` are different files), where a
    format such as ``:g`` would round them to the same name and serve one split for the other.
    """
    return (
        folder
        / "mnist1d"
        / f"mnist1d_n{int(num_samples)}_seed{int(seed)}_split{float(train_split)!r}.npz"
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _generate_mnist1d(seed: int, num_samples: int, train_split: float) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples, args.train_split = seed, num_samples, train_split
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG: leave it as it was  # noqa: NPY002
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    return {
        "x": raw["x"].astype(np.float32),
        "y": raw["y"].astype(np.int64),
        "x_test": raw["x_test"].astype(np.float32),
        "y_test": raw["y_test"].astype(np.int64),
        "t": np.asarray(raw["t"], dtype=np.float32),
    }


def _load_mnist1d(
    folder: Path, seed: int, num_samples: int, train_split: float, refresh: bool
) -> Dataset:
    path = _mnist1d_cache(folder, seed, num_samples, train_split)
    sidecar = path.with_suffix(".sha256")
    if refresh or not path.exists():
        arrays = _generate_mnist1d(seed, num_samples, train_split)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)  # atomic: a killed process never leaves half a cache behind
        sidecar.write_text(_sha256(path) + "\n")
    else:
        if not sidecar.exists() or sidecar.read_text().strip() != _sha256(path):
            raise CorruptCacheError(
                f"the cached MNIST-1D file {path} does not match its checksum {sidecar.name}; "
                f"delete both files or call load_dataset('mnist1d', refresh=True) to regenerate it"
            )
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    return Dataset(
        name="mnist1d",
        x_train=torch.from_numpy(arrays["x"]),
        y_train=torch.from_numpy(arrays["y"]),
        x_test=torch.from_numpy(arrays["x_test"]),
        y_test=torch.from_numpy(arrays["y_test"]),
        classes=tuple(str(i) for i in range(10)),
        meta={
            "source": "mnist1d.data.make_dataset (generated locally)",
            "seed": seed,
            "num_samples": num_samples,
            "train_split": train_split,
            "t": arrays["t"],
            "cache": str(path),
            "sha256": sidecar.read_text().strip(),
        },
    )


# ------------------------------------------------------------------------------------------- digits


def _load_digits(seed: int, train_split: float) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]  # pixel values are 0..16
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, train_size=train_split, random_state=seed, stratify=y
    )
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(x_tr),
        y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy(x_te),
        y_test=torch.from_numpy(y_te),
        classes=tuple(str(i) for i in range(10)),
        meta={"source": "sklearn.datasets.load_digits", "seed": seed, "train_split": train_split},
    )


# ------------------------------------------------------------------- torchvision's downloadable sets


def _expected_files(name: str, folder: Path) -> list[Path]:
    if name in _MNIST_FOLDERS:
        raw = folder / _MNIST_FOLDERS[name] / "raw"
        return [raw / f for pair in _MNIST_FILES.values() for f in pair]
    base = folder / _CIFAR_FOLDER
    return [base / f"data_batch_{i}" for i in range(1, 6)] + [
        base / "test_batch",
        base / "batches.meta",
    ]


def _is_present(name: str, folder: Path) -> bool:
    return all(p.exists() for p in _expected_files(name, folder))


def _missing_message(name: str, folder: Path) -> str:
    missing = [str(p) for p in _expected_files(name, folder) if not p.exists()]
    return (
        f"{name} is not in the data directory {folder} (missing: {', '.join(missing[:3])}"
        f"{' ...' if len(missing) > 3 else ''}). On a machine with internet access run\n"
        f"    python -m labsupport.data fetch {name} --root DIR\n"
        f"then copy DIR to this machine and set LAB_DATA_DIR=DIR (or pass root=DIR)."
    )


def _load_mnist_family(name: str, folder: Path) -> Dataset:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = folder / _MNIST_FOLDERS[name] / "raw"
    parts = {}
    for split, (images, labels) in _MNIST_FILES.items():
        try:
            x = read_image_file(str(raw / images))
            y = read_label_file(str(raw / labels))
        except Exception as exc:  # torchvision asserts on a bad magic number or truncated data
            raise CorruptCacheError(
                f"cannot read {name} {split} files in {raw}: {exc!r}; they are not valid IDX files. "
                f"Delete {raw.parent} and run `python -m labsupport.data fetch {name}` again."
            ) from exc
        if x.ndim != 3 or len(x) != len(y):
            raise CorruptCacheError(
                f"{name} {split}: {raw / images} holds images of shape {tuple(x.shape)} and "
                f"{raw / labels} {len(y)} labels; expected (N, 28, 28) and N labels"
            )
        parts[split] = (x.float().div_(255.0).unsqueeze(1), y.long())
    classes = _FASHION_CLASSES if name == "fashion_mnist" else tuple(str(i) for i in range(10))
    return Dataset(
        name=name,
        x_train=parts["train"][0],
        y_train=parts["train"][1],
        x_test=parts["test"][0],
        y_test=parts["test"][1],
        classes=classes,
        meta={"source": f"torchvision IDX files in {raw}"},
    )


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Reads the CIFAR-10 python batches without running anything they name.

    A pickle may call any importable function while it loads (``os.system`` included), so a file
    swapped into the data directory could run code. These batches need only dicts, lists, strings,
    numbers and numpy arrays; this unpickler resolves numpy's array rebuilding and nothing else
    (the "Restricting Globals" recipe of the ``pickle`` documentation).
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a CIFAR-10 batch holds only dicts, lists and "
                "numpy arrays"
            )
        return super().find_class(module, name)


def _read_python_batch(path: Path) -> dict:
    with open(path, "rb") as fh:
        entry = _ArraysOnlyUnpickler(fh, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"holds a {type(entry).__name__}; expected a dict")
    for value in entry.values():
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise ValueError("holds an array of Python objects; expected numbers")
    return entry


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = _read_python_batch(path)
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except Exception as exc:
        raise CorruptCacheError(
            f"cannot read the CIFAR-10 batch {path}: {exc!r}. Delete {path.parent} and run "
            f"`python -m labsupport.data fetch cifar10` again."
        ) from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise CorruptCacheError(
            f"the CIFAR-10 batch {path} holds data of shape {data.shape} and {len(labels)} labels; "
            f"expected (N, 3072) and N labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(folder: Path) -> Dataset:
    base = folder / _CIFAR_FOLDER
    train = [_read_cifar_batch(base / f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = _read_cifar_batch(base / "test_batch")
    try:
        names = tuple(str(n) for n in _read_python_batch(base / "batches.meta")["label_names"])
    except Exception as exc:
        raise CorruptCacheError(
            f"cannot read the CIFAR-10 class names in {base / 'batches.meta'}: {exc!r}. Delete "
            f"{base} and run `python -m labsupport.data fetch cifar10` again."
        ) from exc
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    return Dataset(
        name="cifar10",
        x_train=torch.from_numpy(x_tr).float().div_(255.0),
        y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy(x_te).float().div_(255.0),
        y_test=torch.from_numpy(y_te),
        classes=names,
        meta={"source": f"CIFAR-10 python batches in {base}"},
    )


def _check_shapes(ds: Dataset) -> None:
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x.shape[0] != y.shape[0] or y.ndim != 1:
            raise CorruptCacheError(
                f"{ds.name} {split}: {x.shape[0]} inputs but labels of shape {tuple(y.shape)}"
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= ds.num_classes):
            raise CorruptCacheError(
                f"{ds.name} {split}: labels span {int(y.min())}..{int(y.max())}; "
                f"expected 0..{ds.num_classes - 1}"
            )
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise CorruptCacheError(
            f"{ds.name}: train samples have shape {tuple(ds.x_train.shape[1:])} but test samples "
            f"{tuple(ds.x_test.shape[1:])}"
        )


# ------------------------------------------------------------------------------------------- fetch


def _torchvision_download(name: str, folder: Path) -> None:
    """Download with torchvision's own code (mirrors, checksums) into ``folder``."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    for train in (True, False):
        cls(str(folder), train=train, download=True)


def fetch(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    downloader: Callable[[str, Path], None] | None = None,
) -> Path:
    """Put dataset ``name`` into the data directory (download or generate) and return the directory.

    Instructors run this (``python -m labsupport.data fetch mnist``) before a workshop without
    internet, then copy the directory to the students' machines.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    folder = data_dir(root)
    if name in ("mnist1d", "digits"):
        load_dataset(name, root=folder)
        return folder
    if not _is_present(name, folder):
        (downloader or _torchvision_download)(name, folder)
        if not _is_present(name, folder):
            raise DatasetNotAvailableError(_missing_message(name, folder))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labsupport.data", description="List, fetch or inspect the course datasets."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the datasets and whether each is on disk")
    p_fetch = sub.add_parser("fetch", help="download or generate datasets into the data directory")
    p_fetch.add_argument("names", nargs="+", choices=sorted(DATASETS), metavar="NAME")
    for p in (p_fetch, sub.choices["list"]):
        p.add_argument(
            "--root", default=None, help="data directory (default: $LAB_DATA_DIR or data/)"
        )
    args = parser.parse_args(argv)
    folder = data_dir(args.root)
    if args.command == "list":
        for name, text in DATASETS.items():
            if name == "digits":
                where = "bundled with scikit-learn"
            elif name == "mnist1d":
                where = "generated on first use"
            else:
                where = "on disk" if _is_present(name, folder) else "not on disk"
            print(f"{name:14s} {where:26s} {text}")
        return 0
    status = 0
    for name in args.names:
        try:
            fetch(name, folder)
            print(f"{name}: ready in {folder}")
        except Exception as exc:
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
