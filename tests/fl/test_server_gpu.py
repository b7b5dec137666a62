"""A FedAvg round on CUDA (marked gpu: skipped without a GPU; `make test-gpu` runs it)."""

import pytest
import torch

from labsupport.fl import DataClient, FedAvgConfig, FedAvgSimulation
from labsupport.models import build_model

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def _clients(n=4, per=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * per, 40, generator=g)
    y = torch.randint(0, 10, (n * per,), generator=g)
    return [DataClient(x[i::n], y[i::n]) for i in range(n)], (x[:100], y[:100])


def test_a_fedavg_round_on_cuda_matches_the_cpu_round(cuda):
    clients, test = _clients()
    cfg = FedAvgConfig(num_rounds=2, fraction_train=1.0, local_epochs=1, batch_size=10, lr=0.1)
    on_gpu = FedAvgSimulation(build_model("mlp", seed=0), clients, test, cfg, device=cuda)
    on_cpu = FedAvgSimulation(build_model("mlp", seed=0), clients, test, cfg, device="cpu")
    h_gpu, h_cpu = on_gpu.run(progress=False), on_cpu.run(progress=False)
    assert next(on_gpu.scratch.parameters()).device.type == "cuda"
    assert all(v.device.type == "cpu" for v in on_gpu.global_state.values())
    for k in on_cpu.global_state:
        torch.testing.assert_close(
            on_gpu.global_state[k], on_cpu.global_state[k], atol=1e-4, rtol=1e-4
        )
    assert abs(h_gpu.final_accuracy - h_cpu.final_accuracy) <= 0.02


def test_lab_device_moves_the_simulation_to_cuda(cuda, monkeypatch):
    monkeypatch.setenv("LAB_DEVICE", "cuda")
    clients, test = _clients()
    sim = FedAvgSimulation(build_model("mlp", seed=0), clients, test, FedAvgConfig(num_rounds=1))
    sim.run(progress=False)
    assert sim.device.type == "cuda"
