
import pytest
import torch

from engram_app.errors import EngramError
from engram_app.settings import DEFAULT_HOME, Settings, default_home, resolve_device


def test_default_home_is_repository_storage(monkeypatch):
    monkeypatch.delenv("ENGRAM_HOME", raising=False)
    assert default_home() == DEFAULT_HOME
    assert DEFAULT_HOME.name == "storage"
    assert (DEFAULT_HOME.parent / "engram_app").is_dir()


def test_engram_home_moves_the_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGRAM_HOME", str(tmp_path / "elsewhere"))
    settings = Settings()
    assert settings.home == (tmp_path / "elsewhere").resolve()
    assert settings.models_dir == settings.home / "models"


def test_defaults_bind_localhost_only():
    settings = Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 7860)


def test_unknown_device_is_refused():
    with pytest.raises(EngramError, match="auto, cpu, cuda"):
        Settings(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_auto_device_without_gpu_is_cpu_fp32():
    plan = resolve_device("auto")
    assert plan.device.type == "cpu" and plan.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_says_what_to_do():
    with pytest.raises(EngramError, match="--device cpu"):
        resolve_device("cuda")
