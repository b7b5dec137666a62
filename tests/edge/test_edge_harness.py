"""The benchmark harness: latency percentiles, ratios, the Pareto front, memory probe, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labsupport.edge.harness import (
    Variant,
    accuracy,
    add_ratios,
    benchmark_variants,
    edge_profile,
    measure_latency,
    ort_variant,
    pareto_mask,
    peak_memory,
    plot_pareto,
    save_outputs,
    torch_variant,
)


def test_pareto_front_matches_a_hand_worked_example():
    cost = [1.0, 2.0, 3.0, 1.5, 3.0, 1.0]
    value = [0.80, 0.90, 0.95, 0.85, 0.90, 0.70]
    # (1, .80) beats (1, .70); (3, .95) beats (3, .90); (2, .90) and (1.5, .85) are on the front
    assert pareto_mask(cost, value).tolist() == [True, True, True, True, False, False]
    assert pareto_mask([1.0, 1.0], [0.5, 0.5]).tolist() == [True, True]  # ties do not dominate
    with pytest.raises(ValueError, match="same length"):
        pareto_mask([1.0], [0.5, 0.6])


def test_measure_latency_runs_warmup_then_repeats():
    calls = []
    t = measure_latency(lambda x: calls.append(1), np.zeros(1), warmup=3, repeats=7)
    assert len(calls) == 10 and t.shape == (7,) and (t >= 0).all()
    with pytest.raises(ValueError):
        measure_latency(lambda x: x, np.zeros(1), repeats=0)


def test_accuracy_counts_argmax_hits_across_batches():
    x = np.eye(10, dtype=np.float32)[np.arange(25) % 10]
    y = np.arange(25) % 10
    y_wrong = y.copy()
    y_wrong[:5] = (y_wrong[:5] + 1) % 10
    assert accuracy(lambda a: a, x, y, batch=4) == 1.0
    assert accuracy(lambda a: a, x, y_wrong, batch=4) == pytest.approx(20 / 25)
    with pytest.raises(ValueError):
        accuracy(lambda a: a, x[:0], y[:0])


def test_edge_profile_pins_and_restores_threads():
    before = torch.get_num_threads()
    with edge_profile(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_table_has_every_column_and_ratios_against_the_baseline(
    tiny_cnn, tiny_onnx, mnist1d, tmp_path, monkeypatch
):
    from labsupport.edge.checkpoint import save_checkpoint

    stem = tmp_path / "tiny"
    save_checkpoint(
        tiny_cnn,
        stem,
        model_name="cnn",
        input_shape=(40,),
        num_classes=10,
        model_kwargs={"channels": 16},
    )
    variants = [
        torch_variant("torch", tiny_cnn, checkpoint=stem),
        ort_variant("ort", tiny_onnx, providers=["CPUExecutionProvider"]),
    ]
    df = benchmark_variants(
        variants, mnist1d.x_test[:200], mnist1d.y_test[:200], repeats=6, rounds=2, warmup=1
    )
    df = add_ratios(df, "torch")
    row = df.set_index("variant")
    for col in (
        "p50_b1_ms",
        "p90_b1_ms",
        "p99_b64_ms",
        "throughput_b64",
        "size_bytes",
        "peak_rss_mib",
        "accuracy",
    ):
        assert (df[col] > 0).all(), col
    assert (row["p50_b1_ms"] <= row["p99_b1_ms"]).all()
    assert row.loc["torch", "speedup_b1"] == 1.0 and row.loc["torch", "acc_drop"] == 0.0
    assert row.loc["ort", "provider"] == "CPUExecutionProvider"
    assert row.loc["ort", "size_bytes"] == tiny_onnx.stat().st_size
    assert abs(row.loc["ort", "acc_drop"]) < 1e-9  # same model, same predictions
    assert set(df["threads"]) == {1}
    monkeypatch.setenv("LAB_RESULTS_DIR", str(tmp_path / "results"))
    paths = save_outputs(df, plot_pareto(df), stem="t")
    assert all(p.is_file() for p in paths.values())
    with pytest.raises(ValueError, match="baseline"):
        add_ratios(df, "nope")


@pytest.mark.slow
def test_memory_probe_reports_a_bigger_peak_for_a_bigger_model(tmp_path):
    from labsupport.edge.export import export_onnx
    from labsupport.models import build_model

    small = export_onnx(build_model("mlp", (40,), 10, hidden=8), tmp_path / "s.onnx")
    big = export_onnx(build_model("mlp", (40,), 10, hidden=4000), tmp_path / "b.onnx")
    ms, mb = peak_memory(small, "onnx"), peak_memory(big, "onnx")
    assert mb["model_rss_mib"] > ms["model_rss_mib"] + 40  # 16M float32 weights = 64 MB
    assert ms["peak_rss_mib"] >= ms["base_rss_mib"] > 0
    assert not ms["torch_loaded"]  # an ONNX Runtime process, as deployed


@pytest.mark.slow
def test_memory_probe_loads_a_checkpoint(tmp_path):
    from labsupport.edge.checkpoint import save_checkpoint
    from labsupport.models import build_model

    stem = tmp_path / "m"
    save_checkpoint(
        build_model("mlp", (40,), 10), stem, model_name="mlp", input_shape=(40,), num_classes=10
    )
    mem = peak_memory(stem, "checkpoint")
    assert mem["torch_loaded"] and mem["peak_rss_mib"] >= mem["base_rss_mib"] > 0
    with pytest.raises(RuntimeError, match="memory probe"):
        peak_memory(tmp_path / "missing", "checkpoint")


def test_duplicate_variant_names_are_rejected():
    v = Variant("a", lambda x: x, "pytorch", 1)
    with pytest.raises(ValueError, match="unique"):
        benchmark_variants([v, v], np.zeros((4, 40), np.float32), np.zeros(4))
    with pytest.raises(ValueError, match="no variants"):
        benchmark_variants([], np.zeros((4, 40), np.float32), np.zeros(4))
