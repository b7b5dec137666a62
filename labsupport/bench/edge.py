"""Chapter 04 benchmark: every deployable variant of the MNIST-1D teacher side by side.

``edge_table`` measures, in one process with one thread (the edge profile), the 128-channel CNN1D
teacher in fp32 PyTorch (the baseline), fp32 ONNX Runtime and static int8 QDQ ONNX Runtime, the
teacher with 50% of its channels removed by structured pruning and fine-tuned, and a 40-channel
student distilled from it (Hinton et al. 2015; T=8, alpha=0.9: chosen on the validation split
before this benchmark was fixed -- they beat T=4, alpha=0.5 -- and notebook 04 sweeps T). For each variant ``v`` the figures are ``v_size_ratio`` (baseline
bytes ÷ variant bytes), ``v_speedup_b1`` / ``v_speedup_b64`` (baseline p50 latency ÷ variant p50 at
batch 1 / 64) and ``v_acc_drop`` (test-accuracy points lost against the baseline). Also:
``int8_vs_fp32_ort_speedup_b64``, ``student_param_ratio`` and ``student_distill_gain`` (test points
the distilled student gains over the same student trained alone, mean over seeds).

Targets: int8 ONNX Runtime >= 3.5x smaller, >= 3x faster at batch 1, within 1 point; int8 vs fp32
ONNX Runtime >= 1.2x at batch 64; 50% structured pruning >= 1.8x faster at batch 1 and within 2
points; the student >= 5x fewer parameters, within 3 points and better than alone.
The table is also written to ``results/edge/edge_table.{csv,json,png}``.
"""

from __future__ import annotations

import torch

from labsupport.edge.checkpoint import mnist1d_splits, save_checkpoint, train_teacher
from labsupport.edge.distill import distill
from labsupport.edge.export import export_onnx
from labsupport.edge.harness import (
    add_ratios,
    benchmark_variants,
    ort_variant,
    plot_pareto,
    save_outputs,
    torch_variant,
)
from labsupport.edge.prune import channel_counts, structured_channel_prune
from labsupport.edge.quantize import ort_static_int8
from labsupport.models import build_model, count_parameters
from labsupport.train import evaluate, train

from . import Result, Target, benchmark, results_dir

STUDENT_CHANNELS = 40
TEMPERATURE, ALPHA = 8.0, 0.9

_VARIANTS = {
    "fp32_ort": "fp32 ONNX Runtime",
    "int8_ort": "int8 ONNX Runtime",
    "pruned50": "pruned 50% (PyTorch)",
    "student": "distilled student (PyTorch)",
}
BASELINE = "fp32 PyTorch"


def _student_pair(teacher, s, steps: int, seed: int) -> tuple[torch.nn.Module, float, float]:
    alone = build_model("cnn", (40,), 10, seed=seed, channels=STUDENT_CHANNELS)
    train(
        alone,
        s.x_train,
        s.y_train,
        steps=steps,
        batch_size=100,
        lr=1e-2,
        optimizer="adam",
        generator=torch.Generator().manual_seed(seed),
    )
    student = build_model("cnn", (40,), 10, seed=seed, channels=STUDENT_CHANNELS)
    distill(
        student,
        teacher,
        s.x_train,
        s.y_train,
        temperature=TEMPERATURE,
        alpha=ALPHA,
        steps=steps,
        seed=seed,
    )
    return (
        student,
        evaluate(student, s.x_test, s.y_test)["accuracy"],
        evaluate(alone, s.x_test, s.y_test)["accuracy"],
    )


@benchmark(
    "edge_table",
    "MNIST-1D teacher vs int8 ONNX Runtime, 50% channel pruning and a distilled student",
    chapter="04",
)
def edge_table(smoke: bool) -> Result:
    s = mnist1d_splits()
    teacher, tcfg = train_teacher(steps=300 if smoke else 4000)
    folder = results_dir() / "edge" / "artifacts"
    fp32 = export_onnx(teacher, folder / "teacher.onnx")
    int8 = ort_static_int8(fp32, folder / "teacher_int8.onnx", s.x_train[:512])

    pruned = structured_channel_prune(teacher, s.x_train[:2], 0.5)
    train(
        pruned,
        s.x_train,
        s.y_train,
        steps=30 if smoke else 1500,
        batch_size=100,
        lr=1e-3,
        optimizer="adam",
        generator=torch.Generator().manual_seed(0),
    )
    pruned.eval()

    seeds = [0] if smoke else [0, 1, 2]
    pairs = [_student_pair(teacher, s, 60 if smoke else 3000, seed) for seed in seeds]
    student = pairs[0][0]
    gain = 100.0 * sum(d - a for _, d, a in pairs) / len(pairs)

    stem = folder / "teacher_fp32"
    save_checkpoint(
        teacher,
        stem,
        model_name="cnn",
        input_shape=(40,),
        num_classes=10,
        model_kwargs={"channels": tcfg["kwargs"]["channels"]},
    )
    variants = [
        torch_variant(BASELINE, teacher, checkpoint=stem),
        ort_variant(_VARIANTS["fp32_ort"], fp32, providers=["CPUExecutionProvider"]),
        ort_variant(_VARIANTS["int8_ort"], int8, providers=["CPUExecutionProvider"]),
        torch_variant(_VARIANTS["pruned50"], pruned),
        torch_variant(_VARIANTS["student"], student),
    ]
    df = benchmark_variants(
        variants,
        s.x_test,
        s.y_test,
        threads=1,
        repeats=30 if smoke else 300,
        rounds=3,
        memory=not smoke,
    )
    df = add_ratios(df, BASELINE)
    save_outputs(df, plot_pareto(df), stem="edge_table")
    rows = df.set_index("variant")
    figures: dict[str, float] = {"teacher_accuracy": float(rows.loc[BASELINE, "accuracy"])}
    for key, name in _VARIANTS.items():
        for col in ("size_ratio", "speedup_b1", "speedup_b64", "acc_drop"):
            figures[f"{key}_{col}"] = round(float(rows.loc[name, col]), 3)
    figures["int8_vs_fp32_ort_speedup_b64"] = round(
        float(
            rows.loc[_VARIANTS["fp32_ort"], "p50_b64_ms"]
            / rows.loc[_VARIANTS["int8_ort"], "p50_b64_ms"]
        ),
        3,
    )
    figures["student_param_ratio"] = round(count_parameters(teacher) / count_parameters(student), 2)
    figures["student_distill_gain"] = round(gain, 2)
    targets = {
        "int8_smaller": Target(
            "int8_ort_size_ratio", min=3.5, note="int8 ORT vs fp32 PyTorch size"
        ),
        "int8_faster_b1": Target("int8_ort_speedup_b1", min=3.0, note="vs fp32 PyTorch, batch 1"),
        "int8_accurate": Target("int8_ort_acc_drop", max=1.0, note="points of test accuracy"),
        "int8_vs_ort_b64": Target(
            "int8_vs_fp32_ort_speedup_b64",
            min=1.2,
            note="int8 vs fp32, both ONNX Runtime, batch 64",
        ),
        "pruned_faster_b1": Target("pruned50_speedup_b1", min=1.8, note="50% channels removed"),
        "pruned_accurate": Target("pruned50_acc_drop", max=2.0, note="after fine-tuning"),
        "student_small": Target("student_param_ratio", min=5.0),
        "student_accurate": Target("student_acc_drop", max=3.0, note="points below the teacher"),
        "student_beats_alone": Target(
            "student_distill_gain", min=0.1, note=f"mean over {len(seeds)} seed(s), test points"
        ),
    }
    details = {
        "teacher": {k: tcfg[k] for k in ("training", "val_accuracy", "test_accuracy")},
        "pruned_channels": channel_counts(pruned),
        "student": {
            "channels": STUDENT_CHANNELS,
            "temperature": TEMPERATURE,
            "alpha": ALPHA,
            "distilled_vs_alone": [(d, a) for _, d, a in pairs],
        },
        "table": df.to_dict(orient="records"),
        "cpu_flags": _cpu_flags(),
    }
    return Result(figures=figures, targets=targets, details=details)


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                    return [w for w in wanted if w in line.split()]
    except OSError:
        pass
    return []
