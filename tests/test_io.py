import pytest

from unlearn.io import atomic_outputs


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
