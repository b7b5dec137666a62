"""Which hardware a lab runs on, and the CPU thread setting that small models need.

* :func:`get_device` -- CUDA, then Apple MPS, then CPU; ``$LAB_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``,
  ``mps``) overrides the choice, with a clear error when the asked-for device is missing.
* :func:`is_jetson` -- an NVIDIA Jetson (L4T) board, found by its device-tree model or release file.
* :func:`tensorrt_status` -- whether TensorRT is *usable*: importing it is not enough, a Builder must be
  created (the import succeeds on machines without a GPU).
* :func:`report` -- everything above plus torch/CUDA/ONNX Runtime versions and providers;
  ``python -m labsupport.device`` prints it.
* :func:`set_threads` -- ``torch.set_num_threads``: 1 by default (``$LAB_THREADS`` overrides). On the
  small shared CPUs these labs target, all-core intra-op threading slows a tiny model's training
  several-fold as soon as another process keeps a core busy (a second client, a Ray worker);
  ``python -m labsupport.bench threads`` measures it on yours.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

__all__ = ["get_device", "is_jetson", "report", "set_threads", "tensorrt_status"]

_JETSON_MODEL = Path("/proc/device-tree/model")
_L4T_RELEASE = Path("/etc/nv_tegra_release")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def get_device(prefer: str | None = None) -> torch.device:
    """The device to run on: ``prefer`` or ``$LAB_DEVICE`` if set, else CUDA > MPS > CPU."""
    wanted = prefer or os.environ.get("LAB_DEVICE")
    if wanted:
        try:
            device = torch.device(wanted)
        except RuntimeError as exc:
            raise ValueError(
                f"LAB_DEVICE/prefer={wanted!r} is not a device name; expected cpu, cuda, cuda:N or mps"
            ) from exc
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"device {wanted!r} was asked for but torch {torch.__version__} sees no CUDA GPU; "
                    "unset LAB_DEVICE or set it to 'cpu'"
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise RuntimeError(
                    f"device {wanted!r} was asked for but only {torch.cuda.device_count()} GPU(s) exist"
                )
        if device.type == "mps" and not _mps_available():
            raise RuntimeError(f"device {wanted!r} was asked for but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def is_jetson() -> bool:
    """True on an NVIDIA Jetson (L4T): its device-tree model names Jetson, or L4T's release file exists."""
    try:
        if _JETSON_MODEL.exists() and "jetson" in _JETSON_MODEL.read_text(errors="ignore").lower():
            return True
    except OSError:
        pass
    return _L4T_RELEASE.exists()


def tensorrt_status() -> tuple[bool, str]:
    """``(usable, detail)``: TensorRT imports *and* a Builder can be created (needs a GPU)."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or a broken install raising OSError on its libraries
        return False, f"not installed ({type(exc).__name__}: {exc})"
    try:
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        if builder is None:
            return (
                False,
                f"TensorRT {trt.__version__} imports but cannot create a Builder (no GPU?)",
            )
        del builder
    except Exception as exc:
        return False, f"TensorRT {trt.__version__} imports but a Builder failed: {exc}"
    return True, f"TensorRT {trt.__version__}"


def _onnxruntime_info() -> dict:
    try:
        import onnxruntime as ort
    except Exception as exc:
        return {"version": None, "providers": [], "error": str(exc)}
    return {"version": ort.__version__, "providers": ort.get_available_providers()}


def report() -> dict:
    """What this machine offers the labs, as a dict (printed by ``python -m labsupport.device``)."""
    trt_ok, trt_detail = tensorrt_status()
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "mps_available": _mps_available(),
        "jetson": is_jetson(),
        "device": str(get_device()),
        "onnxruntime": _onnxruntime_info(),
        "tensorrt_usable": trt_ok,
        "tensorrt": trt_detail,
    }


def set_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``num_threads``, else ``$LAB_THREADS``, else 1. Returns the value."""
    if num_threads is None:
        env = os.environ.get("LAB_THREADS")
        try:
            num_threads = int(env) if env else 1
        except ValueError as exc:
            raise ValueError(f"LAB_THREADS must be a positive integer, got {env!r}") from exc
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    torch.set_num_threads(num_threads)
    return num_threads


if __name__ == "__main__":
    print(json.dumps(report(), indent=2))
