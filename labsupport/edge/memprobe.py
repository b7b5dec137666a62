"""Peak memory of one inference process: load a model file, run it, report the peak RSS (chapter 04).

Run as a *script* (``python path/to/memprobe.py onnx model.onnx``), not with ``-m``, so that the
``labsupport`` package -- and with it PyTorch -- is not imported for an ONNX model: the process
holds only what an ONNX Runtime deployment would. Prints one JSON line: ``peak_rss_mib`` (Linux
``VmHWM`` of this process; ``ru_maxrss`` elsewhere -- on Linux ``ru_maxrss`` keeps the *parent's*
high-water mark across fork+exec), ``base_rss_mib`` (RSS after importing the runtime, before
loading the model), ``model_rss_mib`` (their difference) and ``torch_loaded``. Used by
:func:`labsupport.edge.harness.peak_memory`.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys


def _status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def peak_rss_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024**2 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def probe(kind: str, path: str, batch: int, threads: int, length: int) -> dict[str, float]:
    if batch < 1 or threads < 1:
        raise ValueError(f"batch and threads must be >= 1, got {batch} and {threads}")
    if kind == "onnx":
        import numpy as np
        import onnxruntime as ort

        base = rss_mib()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((batch, length), dtype=np.float32)
        for _ in range(5):
            sess.run(None, {sess.get_inputs()[0].name: x})
    elif kind == "checkpoint":
        import torch

        from labsupport.edge.checkpoint import load_checkpoint

        torch.set_num_threads(threads)
        base = rss_mib()
        model, cfg = load_checkpoint(path)
        x = torch.randn(batch, *cfg["input_shape"])
        with torch.inference_mode():
            for _ in range(5):
                model(x)
    else:
        raise ValueError(f"unknown artifact kind {kind!r}; expected 'onnx' or 'checkpoint'")
    peak = peak_rss_mib()
    return {
        "peak_rss_mib": peak,
        "base_rss_mib": base,
        "model_rss_mib": peak - base,
        "torch_loaded": "torch" in sys.modules,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="peak RSS of a process that loads and runs a model"
    )
    parser.add_argument("kind", choices=["onnx", "checkpoint"])
    parser.add_argument("path")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--length", type=int, default=40)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.kind, args.path, args.batch, args.threads, args.length)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
