import logging
import random
import warnings

import numpy as np
import pytest
import torch

from lessons_lib import session


def test_seed_everything_makes_every_generator_repeat():
    session.seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(3))
    session.seed_everything(123)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    torch.testing.assert_close(first[2], second[2], rtol=0, atol=0)
    g = session.seed_everything(5)
    torch.testing.assert_close(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_seed_rejects_non_integers(bad):
    with pytest.raises(ValueError, match="seed"):
        session.seed_everything(bad)


def test_pick_device_auto_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert session.pick_device("auto") == torch.device("cpu")
    assert session.pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("asked", ["cuda", "cuda:0"])
def test_pick_device_cuda_without_gpu_is_a_clear_error(monkeypatch, asked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device=.*no CUDA GPU.*'auto' or device='cpu'"):
        session.pick_device(asked)


@pytest.mark.parametrize("bad", ["gpu", "CPU", "", 0])
def test_pick_device_lists_accepted_values(bad):
    with pytest.raises(ValueError, match=r"device must be one of \('auto', 'cpu', 'cuda'\)"):
        session.pick_device(bad)


def test_known_noise_is_hidden_and_other_warnings_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with session.known_noise_silenced():
            warnings.warn("torch.ao.quantization is deprecated and will be removed", DeprecationWarning)
            warnings.warn("something else is wrong", UserWarning)
        warnings.warn("torch.ao.quantization is deprecated and will be removed", DeprecationWarning)
    messages = [str(w.message) for w in caught]
    assert messages == ["something else is wrong", "torch.ao.quantization is deprecated and will be removed"]


def test_known_log_line_is_dropped_and_others_kept(caplog):
    session.silence_known_noise()
    logger = logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        logger.warning("<enum 'ScaleCalculationMode'> is an Enum subclass and is now natively supported by torch.compile as an opaque value type.")
        logger.warning("<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an opaque value type.")
        logger.warning("a different pytree warning")
    assert [r.getMessage() for r in caplog.records] == ["a different pytree warning"]


def test_machine_info_reports_this_process():
    info = session.machine_info("cpu")
    assert info["torch"] == torch.__version__
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["cuda_available"] == torch.cuda.is_available()
