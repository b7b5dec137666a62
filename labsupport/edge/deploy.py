"""The deployment recipe of chapter 04 (and the Jetson worked example): checkpoint in, artifacts out.

``python -m labsupport.edge.deploy CHECKPOINT OUT_DIR`` takes a trained model saved by
:func:`labsupport.edge.checkpoint.save_checkpoint` (safetensors + JSON) and writes into ``OUT_DIR``:

* ``model.onnx`` -- fp32, dynamic batch (:func:`labsupport.edge.export.export_onnx`);
* ``model_int8.onnx`` -- static int8 QDQ, calibrated on the checkpoint's training data when its JSON
  names a dataset (``"training": {"dataset": "mnist1d"}``) else on Gaussian noise (said in the
  report); ``model_int8_sym.onnx`` -- the symmetric variant TensorRT needs;
* ``model_fp16.engine`` / ``model_int8.engine`` -- TensorRT engines where TensorRT is usable
  (otherwise the report gives the reason);
* ``report.json`` -- for each artifact: its size on disk, the provider that ran it, its parity
  against PyTorch (max abs logit diff, argmax agreement) and its p50 latency at batch 1 and 64.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from labsupport.edge.checkpoint import load_checkpoint
from labsupport.edge.export import OrtModel, export_onnx, onnx_size_bytes, parity
from labsupport.edge.harness import measure_latency
from labsupport.edge.quantize import ort_static_int8
from labsupport.edge.tensorrt import TensorRTModel, build_engine, to_fp16_onnx

__all__ = ["deploy", "main"]


def _calibration(config: dict, n: int, seed: int) -> tuple[torch.Tensor, str]:
    shape = tuple(config["input_shape"])
    dataset = (config.get("training") or {}).get("dataset") or config.get("dataset")
    if dataset == "mnist1d" and shape == (40,):
        from labsupport.data import load_dataset

        ds = load_dataset("mnist1d")
        idx = torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(seed))[:n]
        return ds.x_train[idx], f"{n} training samples of mnist1d"
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen), f"{n} Gaussian-noise inputs (no dataset named)"


def _latency(run, shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    out = {}
    for b in (1, 64):
        x = np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)
        t = measure_latency(run, x, warmup=5, repeats=repeats)
        out[f"p50_b{b}_ms"] = float(np.median(t) * 1e3)
    return out


def deploy(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    calib_samples: int = 512,
    threads: int = 1,
    repeats: int = 50,
    seed: int = 0,
) -> dict:
    """Run the recipe; returns the report (also written to ``OUT_DIR/report.json``)."""
    if calib_samples < 1:
        raise ValueError(f"calib_samples must be >= 1, got {calib_samples}")
    model, config = load_checkpoint(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(config["input_shape"])
    calib, calib_note = _calibration(config, calib_samples, seed)
    check_x = calib[: min(256, len(calib))]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fp32 = export_onnx(model, out / "model.onnx", input_shape=shape)
        int8 = ort_static_int8(fp32, out / "model_int8.onnx", calib)
        int8_sym = ort_static_int8(fp32, out / "model_int8_sym.onnx", calib, symmetric=True)
        report: dict = {
            "checkpoint": str(Path(checkpoint)),
            "model": {k: config[k] for k in ("model", "input_shape", "num_classes", "kwargs")},
            "calibration": calib_note,
            "threads": threads,
            "artifacts": {},
        }

        def torch_run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        report["pytorch_fp32"] = _latency(torch_run, shape, repeats)
        for name, path in (("onnx_fp32", fp32), ("onnx_int8", int8), ("onnx_int8_sym", int8_sym)):
            run = OrtModel(path, threads=threads)
            report["artifacts"][name] = {
                "path": path.name,
                "size_bytes": onnx_size_bytes(path),
                "provider": run.provider,
                "providers_dropped": run.dropped,
                "parity": parity(model, run, check_x),
                **_latency(run, shape, repeats),
            }
        trt_builds = {
            "fp16": (to_fp16_onnx(fp32, out / "model_fp16.onnx"), "model_fp16.engine"),
            "int8": (int8_sym, "model_int8.engine"),
        }
        tensorrt: dict = {}
        for precision, (src, engine_name) in trt_builds.items():
            try:
                build = build_engine(src, precision, out_path=out / engine_name, input_shape=shape)
            except RuntimeError as exc:
                tensorrt[precision] = {"built": False, "reason": str(exc)}
                continue
            entry: dict = {"built": build.built, "reason": build.reason}
            if build.built:
                run = TensorRTModel(build.engine)
                entry.update(
                    path=engine_name,
                    size_bytes=len(build.engine),
                    parity=parity(model, run, check_x),
                    **_latency(run, shape, repeats),
                )
            tensorrt[precision] = entry
        report["tensorrt"] = tensorrt
    finally:
        torch.set_num_threads(before)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labsupport.edge.deploy",
        description="Export a safetensors+JSON checkpoint to ONNX, INT8 ONNX and TensorRT, with a report.",
    )
    parser.add_argument("checkpoint", help="checkpoint stem, .json or .safetensors")
    parser.add_argument("out_dir")
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        report = deploy(
            args.checkpoint,
            args.out_dir,
            calib_samples=args.calib_samples,
            threads=args.threads,
            repeats=args.repeats,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, a in report["artifacts"].items():
        print(
            f"{name}: {a['size_bytes']} B, {a['provider']}, max|diff| "
            f"{a['parity']['max_abs_diff']:.2e}, argmax {a['parity']['argmax_agreement']:.3f}, "
            f"p50 b1 {a['p50_b1_ms']:.3f} ms"
        )
    for precision, t in report["tensorrt"].items():
        print(f"tensorrt {precision}: {'built' if t['built'] else t['reason']}")
    print(f"report: {Path(args.out_dir) / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
