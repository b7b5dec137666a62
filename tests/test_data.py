from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from labsupport import data
from labsupport.data import CorruptCacheError, DatasetNotAvailableError, fetch, load_dataset


def test_mnist1d_default_split_matches_the_paper(mnist1d):
    assert mnist1d.x_train.shape == (4000, 40) and mnist1d.x_test.shape == (1000, 40)
    assert mnist1d.x_train.dtype == torch.float32 and mnist1d.y_train.dtype == torch.int64
    assert mnist1d.num_classes == 10 and mnist1d.input_shape == (40,)
    # 500 samples per class before the shuffle and split
    counts = np.bincount(np.concatenate([mnist1d.y_train.numpy(), mnist1d.y_test.numpy()]))
    assert counts.tolist() == [500] * 10


def test_mnist1d_matches_the_mnist1d_package_and_is_deterministic(tmp_path):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = 200, 3
    ref = make_dataset(args)
    ours = load_dataset("mnist1d", root=tmp_path, num_samples=200, seed=3)
    np.testing.assert_allclose(ours.x_train.numpy(), ref["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours.y_test.numpy(), ref["y_test"])
    again = load_dataset("mnist1d", root=tmp_path, num_samples=200, seed=3)  # from the cache
    assert torch.equal(ours.x_train, again.x_train)
    other = load_dataset("mnist1d", root=tmp_path, num_samples=200, seed=4)
    assert not torch.equal(ours.x_train, other.x_train)


def test_mnist1d_generation_leaves_numpy_global_rng_alone(tmp_path):
    np.random.seed(123)  # noqa: NPY002
    expected = np.random.rand()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    load_dataset("mnist1d", root=tmp_path, num_samples=100, refresh=True)
    assert np.random.rand() == expected  # noqa: NPY002


def test_corrupt_mnist1d_cache_gives_a_clear_error_and_refresh_repairs_it(tmp_path):
    ds = load_dataset("mnist1d", root=tmp_path, num_samples=100)
    cache = tmp_path / "mnist1d" / "mnist1d_n100_seed42_split0.8.npz"
    assert ds.meta["cache"] == str(cache)
    cache.write_bytes(cache.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CorruptCacheError, match="refresh=True"):
        load_dataset("mnist1d", root=tmp_path, num_samples=100)
    repaired = load_dataset("mnist1d", root=tmp_path, num_samples=100, refresh=True)
    assert torch.equal(repaired.x_train, ds.x_train)


def test_data_dir_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_DATA_DIR", str(tmp_path / "elsewhere"))
    assert data.data_dir() == tmp_path / "elsewhere"
    assert (tmp_path / "elsewhere").is_dir()


def test_digits_are_images_in_unit_range():
    ds = load_dataset("digits")
    assert ds.input_shape == (1, 8, 8)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert float(ds.x_train.min()) >= 0.0 and float(ds.x_train.max()) <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"name": "mnist1d", "train_split": 1.5}, "train_split"),
        ({"name": "mnist1d", "num_samples": 5}, "num_samples"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(**kwargs)


# ------------------------------------------------------------- torchvision formats on tiny files


def _write_idx_images(path, images: np.ndarray, gz: bool = False) -> None:
    header = struct.pack(">IIII", 2051, images.shape[0], images.shape[1], images.shape[2])
    payload = header + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _write_idx_labels(path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 2049, labels.shape[0]) + labels.astype(np.uint8).tobytes())


def _write_tiny_mnist(root, folder="MNIST", n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    images = {
        s: rng.integers(0, 256, size=(n, 28, 28)) for s, n in (("train", n_train), ("t10k", n_test))
    }
    labels = {s: rng.integers(0, 10, size=len(images[s])) for s in images}
    for split in ("train", "t10k"):
        _write_idx_images(raw / f"{split}-images-idx3-ubyte", images[split])
        _write_idx_labels(raw / f"{split}-labels-idx1-ubyte", labels[split])
    return images, labels


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_family_reads_idx_files(tmp_path, name, folder):
    images, labels = _write_tiny_mnist(tmp_path, folder)
    ds = load_dataset(name, root=tmp_path, download=False)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), images["train"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(ds.y_test.numpy(), labels["t10k"])
    if name == "fashion_mnist":
        assert ds.classes[9] == "Ankle boot"


def test_truncated_idx_file_is_reported_as_corrupt(tmp_path):
    _write_tiny_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCacheError, match="fetch mnist"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_label_count_mismatch_is_reported(tmp_path):
    _write_tiny_mnist(tmp_path)
    _write_idx_labels(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(CorruptCacheError, match="expected"):
        load_dataset("mnist", root=tmp_path, download=False)


def _write_tiny_cifar(root, per_batch=3):
    rng = np.random.default_rng(1)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=per_batch).tolist(),
        }
        written[name] = entry
        with open(base / name, "wb") as fh:
            pickle.dump(entry, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump(
            {
                "label_names": [
                    "airplane",
                    "automobile",
                    "bird",
                    "cat",
                    "deer",
                    "dog",
                    "frog",
                    "horse",
                    "ship",
                    "truck",
                ]
            },
            fh,
        )
    return written


def test_cifar10_reads_python_batches(tmp_path):
    written = _write_tiny_cifar(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path, download=False)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    expected = written["data_batch_1"]["data"][0].reshape(3, 32, 32) / 255.0
    np.testing.assert_allclose(ds.x_train[0].numpy(), expected, atol=1e-6)
    assert ds.classes[0] == "airplane" and ds.y_test.tolist() == written["test_batch"]["labels"]


def test_cifar10_wrong_shape_is_reported(tmp_path):
    _write_tiny_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]}, fh)
    with pytest.raises(CorruptCacheError, match="3072"):
        load_dataset("cifar10", root=tmp_path, download=False)


class _RunsCode:
    """Unpickled by plain pickle, this calls ``pathlib.Path.touch`` on a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("target", ["test_batch", "batches.meta"])
def test_a_cifar_batch_that_would_run_code_is_refused_without_running_it(tmp_path, target):
    _write_tiny_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / target, "wb") as fh:
        pickle.dump(
            {"data": _RunsCode(marker), "labels": [0], "label_names": [_RunsCode(marker)]}, fh
        )
    pickle.loads(pickle.dumps(_RunsCode(tmp_path / "check")))  # the payload does run under pickle
    assert (tmp_path / "check").exists()
    with pytest.raises(CorruptCacheError, match="refused global pathlib"):
        load_dataset("cifar10", root=tmp_path, download=False)
    assert not marker.exists()


def test_missing_dataset_offline_says_how_to_fetch(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="python -m labsupport.data fetch mnist"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_failed_download_says_how_to_fetch(tmp_path, monkeypatch):
    def offline(name, folder):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "_torchvision_download", offline)
    with pytest.raises(DatasetNotAvailableError, match=r"fetch cifar10(.|\n)*name resolution"):
        load_dataset("cifar10", root=tmp_path)


def test_fetch_uses_the_downloader_and_then_loads(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, folder):  # stands in for torchvision's download into the same layout
        calls.append(name)
        _write_tiny_mnist(folder)

    monkeypatch.setattr(data, "_torchvision_download", fake_download)
    assert data.main(["fetch", "mnist", "--root", str(tmp_path)]) == 0
    assert (
        data.main(["fetch", "mnist", "--root", str(tmp_path)]) == 0
    )  # present: no second download
    assert calls == ["mnist"]
    assert load_dataset("mnist", root=tmp_path, download=False).x_train.shape[0] == 6


def test_fetch_command_reports_failure_with_exit_code(tmp_path, monkeypatch, capsys):
    def broken(name, folder):
        raise OSError("no route to host")

    monkeypatch.setattr(data, "_torchvision_download", broken)
    assert data.main(["fetch", "fashion_mnist", "--root", str(tmp_path)]) == 1
    assert "no route to host" in capsys.readouterr().err


def test_fetch_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        fetch("svhn", tmp_path)


def test_list_command_shows_every_dataset(tmp_path, capsys):
    assert data.main(["list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in data.DATASETS:
        assert name in out
