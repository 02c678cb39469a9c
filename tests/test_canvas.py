"""The style x object canvas: written in UnlearnCanvas's folder format, read back by the same
reader a real UnlearnCanvas folder goes through, and the `style` kind's evaluation tasks on it."""

import pytest

from unlearn.data import synthetic as S
from unlearn.data.canvas import SEED_IMAGES, read_canvas
from unlearn.data.curate import Concept
from unlearn.data.world import OBJECTS, STYLES
from unlearn.errors import UnlearnError


@pytest.fixture(scope="module")
def canvas_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvas") / "canvas"
    S.write_canvas(S.SyntheticConfig(seed=3, image_size=32, canvas_per_cell=2), root)
    return root


def test_the_canvas_is_in_unlearncanvas_folder_format(canvas_dir):
    assert (canvas_dir / "Pixel_Art" / "rocket" / "1.jpg").is_file() and (canvas_dir / SEED_IMAGES / "Mickey" / "2.jpg").is_file()
    assert not (canvas_dir / "Pixel_Art" / "rocket" / "3.jpg").exists()
    c = read_canvas(canvas_dir)
    assert len(c) == (len(STYLES) + 1) * len(OBJECTS) * 2
    assert c.style_names == sorted(STYLES) and c.object_names == sorted(o.name for o in OBJECTS)
    by_style = c.by_style()
    assert len(by_style) == len(STYLES) * len(OBJECTS) * 2 and by_style.classnames == sorted(STYLES)
    assert all(by_style.classnames[label] == path.parent.parent.name.replace("_", " ") for path, label in zip(by_style.paths, by_style.labels))


def test_the_same_seed_draws_the_same_canvas(canvas_dir, tmp_path):
    again = S.write_canvas(S.SyntheticConfig(seed=3, image_size=32, canvas_per_cell=2), tmp_path / "canvas")
    first = read_canvas(canvas_dir)
    assert [p.read_bytes() for p in again.paths] == [p.read_bytes() for p in first.paths]
    other = S.write_canvas(S.SyntheticConfig(seed=4, image_size=32, canvas_per_cell=1), tmp_path / "other")
    assert other.paths[0].read_bytes() != first.paths[0].read_bytes()


def test_a_folder_in_another_shape_is_a_one_line_error(tmp_path):
    with pytest.raises(UnlearnError, match="canvas folder not found"):
        read_canvas(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "1.jpg").write_bytes(b"x")
    with pytest.raises(UnlearnError, match=r"no <Style>/<Object>/<n>.jpg image under"):
        read_canvas(tmp_path / "flat")
    (tmp_path / "seeds" / SEED_IMAGES / "Mickey").mkdir(parents=True)
    (tmp_path / "seeds" / SEED_IMAGES / "Mickey" / "1.jpg").write_bytes(b"x")
    with pytest.raises(UnlearnError, match="holds only Seed_Images"):
        read_canvas(tmp_path / "seeds")
    with pytest.raises(UnlearnError, match="canvas_per_cell is 0"):
        S.write_canvas(S.SyntheticConfig(canvas_per_cell=0), tmp_path / "none")


def test_a_style_concept_is_scored_among_the_styles_with_the_objects_as_utility(canvas_dir, tiny_world):
    import shutil

    from unlearn.eval.suite import concept_tasks

    eval_dir = canvas_dir.parent / "eval"
    if not eval_dir.exists():
        shutil.copytree(tiny_world / "eval", eval_dir)
        shutil.copytree(canvas_dir, eval_dir / "canvas")
    tasks = {part: concept_tasks(eval_dir, Concept("Pixel Art", "style"), part, 0.25, 0) for part in ("val", "test")}
    test = tasks["test"]
    assert test.forget.classnames == sorted(STYLES) and test.forget.classnames[test.target] == "Pixel Art"
    assert {p.parent.parent.name for p in test.forget.paths} == {"Pixel_Art"}
    assert "Pixel_Art" not in {p.parent.parent.name for p in test.retain.paths} and len({p.parent.parent.name for p in test.retain.paths}) == 7
    assert test.utility.classnames == [o.name for o in OBJECTS]  # the ImageNet-style set
    assert not set(tasks["val"].forget.paths) & set(test.forget.paths)
    assert len(tasks["val"].forget.paths) + len(test.forget.paths) == len(OBJECTS) * 2
    with pytest.raises(UnlearnError, match="canvas folder not found"):
        concept_tasks(tiny_world / "eval", Concept("Pixel Art", "style"), "test", 0.25, 0)  # no canvas beside the sets
