import json

import pytest
import torch

from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs, read_hashed_tensors, save_safetensors, sha256_file


def test_atomic_outputs_replace_all_or_nothing(tmp_path):
    d, f = tmp_path / "out", tmp_path / "m.json"
    with atomic_outputs(d, f) as (td, tf):
        (td / "a").write_text("1")
        tf.write_text("{}")
    assert (d / "a").read_text() == "1" and f.read_text() == "{}"
    with pytest.raises(RuntimeError):
        with atomic_outputs(d, f) as (td, tf):
            (td / "b").write_text("2")
            tf.write_text('{"x": 1}')
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "out"]
    assert [p.name for p in d.iterdir()] == ["a"] and f.read_text() == "{}"
    with pytest.raises(FileNotFoundError, match="was not written"):
        with atomic_outputs(d, f) as (td, tf):
            (td / "c").write_text("3")
    assert [p.name for p in d.iterdir()] == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "out"]


def test_hashed_tensors_read_back_or_refused_in_one_line(tmp_path):
    """The one reader of tensors saved beside a record of their hashes (retain statistics, concept
    moments, gradients, patches): each way a copy can be wrong is one line naming the file and the fix."""
    d = tmp_path / "t"
    d.mkdir()
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}

    def write(t=tensors, record=None):
        save_safetensors(t, d / "w.safetensors")
        (d / "rec.json").write_text(json.dumps({"files": {"w.safetensors": sha256_file(d / "w.safetensors")}} if record is None else record))

    def read():
        return read_hashed_tensors(d, "rec.json", ("w.safetensors",), lambda r: r["files"], "test tensors", "run `make t`")

    write()
    meta, read_back = read()
    assert torch.equal(read_back["w.safetensors"]["w"], tensors["w"]) and set(meta) == {"files"}
    cases = [
        (lambda: (d / "rec.json").unlink(), r"^test tensors missing: .*rec\.json; run `make t`$"),
        (lambda: write(record=[1, 2]), r"rec\.json is not a test tensors record \(TypeError"),
        (lambda: write(record={"other": 1}), r"rec\.json is not a test tensors record \(KeyError"),
        (lambda: (d / "rec.json").write_text("{"), r"rec\.json is not a test tensors record \(JSONDecodeError"),
        (lambda: (d / "w.safetensors").write_bytes((d / "w.safetensors").read_bytes()[:-1]), r"w\.safetensors does not match the hash in its rec\.json"),
        (lambda: write(t={"w": torch.tensor([1.0, float("nan")])}), r"^test tensors in .*w\.safetensors: w holds NaN or inf; run `make t`$"),
    ]
    for spoil, message in cases:
        write()
        spoil()
        with pytest.raises(UnlearnError, match=message):
            read()


def test_a_stage_metrics_split_into_results_and_the_run_cost_and_back(tmp_path, monkeypatch):
    from unlearn.runs import read_metrics, split_cost, with_cost, write_metrics

    metrics = {"forget_top1": 0.0, "test_sizes": {"forget": 17}, "time_s": {"search": 3.2, "total": 9.1}, "peak_memory_mb": 1400.5,
               "phases_s": {"eval": 1.0}, "time_ratio_to_slug": {"ga": 1.2}, "checkpoints_train_min": [1.5, 3.0], "threads": 2,
               "rows": [{"concept": "A", "time_s": {"unlearn": 4.0}, "epochs": [{"forget_top1": 1.0, "train_s": 0.5}]}, {"concept": "B"}]}
    results, cost = split_cost(metrics)
    assert results == {"forget_top1": 0.0, "test_sizes": {"forget": 17}, "threads": 2, "rows": [{"concept": "A", "epochs": [{"forget_top1": 1.0}]},
                                                                                                 {"concept": "B"}]}
    assert cost["rows"] == [{"time_s": {"unlearn": 4.0}, "epochs": [{"train_s": 0.5}]}, {}] and cost["checkpoints_train_min"] == [1.5, 3.0]
    assert with_cost(results, cost) == metrics
    monkeypatch.chdir(tmp_path)
    write_metrics(tmp_path / "m.json", metrics, "stage@x")
    assert json.loads((tmp_path / "m.json").read_text()) == results
    record = json.loads((tmp_path / "runs" / "stage@x.json").read_text())
    assert record["stage"] == "stage@x" and record["host"] and record["peak_memory_mb"] == 1400.5
    assert record["cpu"] and record["torch"].startswith(torch.__version__) and " threads" in record["torch"]
    assert read_metrics(tmp_path / "m.json", "stage@x") == metrics
    (tmp_path / "runs" / "stage@x.json").unlink()  # a stage DVC restored instead of running: results only
    assert read_metrics(tmp_path / "m.json", "stage@x") == results
