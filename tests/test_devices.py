"""Device choice for training and inference: one check, one clear error (GPUs simulated)."""
import pytest
import torch

from vmat_diffusion import devices
from vmat_diffusion.cli import train as train_cli
from vmat_diffusion.inference import InferenceInputError, autocast_dtype, resolve_device
from vmat_diffusion.training import loop


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA GPUs, as far as the device checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_devices_that_exist_resolve():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert devices.resolve_device("auto") == expected


def test_gpu_choice_on_a_two_gpu_machine(two_gpus):
    assert devices.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert devices.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert devices.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"cuda:2 requested but this machine has 2 CUDA GPU\(s\)"):
        devices.resolve_device("cuda:2")
    with pytest.raises(InferenceInputError, match="cuda:7"):
        resolve_device("cuda:7")


@pytest.mark.parametrize("name", ["mps", "xpu", "meta", "gpu0"])
def test_unsupported_device_types_are_one_clear_error(name):
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        devices.resolve_device(name)
    with pytest.raises(InferenceInputError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_named():
    with pytest.raises(ValueError, match="CUDA is not available"):
        devices.resolve_device("cuda:0")


def test_processes_must_each_get_a_gpu(two_gpus):
    devices.check_processes_fit("auto", 2)
    devices.check_processes_fit("cpu", 8)  # gloo processes on the CPU
    with pytest.raises(ValueError, match="this machine has 2"):
        devices.check_processes_fit("cuda", 4)
    with pytest.raises(ValueError, match="names one GPU"):
        devices.check_processes_fit("cuda:1", 2)


def test_train_cli_refuses_processes_that_would_share_a_gpu(tmp_path, capsys):
    code = train_cli.main(["--data_dir", str(tmp_path), "--devices", "2", "--device", "cuda:0"])
    assert code == 2
    assert "names one GPU, but 2 processes would share it" in capsys.readouterr().err


def test_auto_precision_uses_fp16_with_loss_scaling_where_bf16_is_emulated(two_gpus, monkeypatch):
    # torch >= 2.3 says bf16 is "supported" on a V100 (emulated); 2.3 cannot be asked to exclude that
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    capability = {0: (7, 0), 1: (8, 0)}  # cuda:0 a V100, cuda:1 an A100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[torch.device(device).index])
    v100, a100 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert not devices.cuda_bf16_is_native(v100) and devices.cuda_bf16_is_native(a100)
    assert loop.resolve_precision("auto", v100) == (torch.float16, True)
    assert autocast_dtype("auto", v100) is None
    assert loop.resolve_precision("auto", a100) == (torch.bfloat16, False)
    assert autocast_dtype("auto", a100) == torch.bfloat16
