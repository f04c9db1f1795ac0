import json

import numpy as np
import pytest
import torch

from lessons_lib import results


def _record(tmp_path, metrics, lesson="02_int8_quantization"):
    return results.record(lesson, metrics, parameters={"quick": True, "device": "auto", "seed": 0},
                          results_dir=tmp_path, device=torch.device("cpu"), quick=True)


def test_record_writes_the_documented_structure(tmp_path):
    path = _record(tmp_path, {"acc": torch.tensor(0.5), "n": np.int64(3), "f": np.float32(0.25),
                              "ok": True, "module": "layers.3.mlp", "big": float("inf")})
    assert path == tmp_path / "02_int8_quantization.json"
    data = json.loads(path.read_text())
    assert data["lesson"] == "02_int8_quantization"
    assert data["device"] == "cpu" and data["quick"] is True
    assert data["parameters"] == {"quick": True, "device": "auto", "seed": 0}
    assert data["metrics"] == {"acc": 0.5, "n": 3, "f": 0.25, "ok": True, "module": "layers.3.mlp", "big": "inf"}
    assert results.load_all(tmp_path)["02_int8_quantization"]["metrics"]["n"] == 3


@pytest.mark.parametrize(
    "metrics,error,match",
    [
        ({}, ValueError, "empty"),
        ({"bad name": 1}, ValueError, "identifiers"),
        ({"v": torch.ones(2)}, ValueError, "single number"),
        ({"v": [1, 2]}, TypeError, "number"),
    ],
)
def test_record_refuses_bad_metrics_and_keeps_the_previous_file(tmp_path, metrics, error, match):
    path = _record(tmp_path, {"acc": 0.9})
    before = path.read_text()
    with pytest.raises(error, match=match):
        _record(tmp_path, metrics)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no stray temporary file


def test_record_refuses_a_lesson_name_that_is_not_a_notebook_stem(tmp_path):
    with pytest.raises(ValueError, match="notebook stem"):
        _record(tmp_path, {"acc": 1.0}, lesson="../escape")


def test_load_all_is_in_lesson_order(tmp_path):
    _record(tmp_path, {"a": 1}, lesson="03_gptq")
    _record(tmp_path, {"a": 1}, lesson="00_orientation")
    (tmp_path / "notes.json").write_text("{}")
    assert list(results.load_all(tmp_path)) == ["00_orientation", "03_gptq"]
