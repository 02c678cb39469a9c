"""Every param a stage reads is declared for that stage in dvc.yaml (checked twice: statically
on the stage's source, and at run time by StageParams, which the pipeline test exercises)."""

import re

import pytest
import yaml

from tests.conftest import ROOT
from unlearn.errors import UnlearnError
from unlearn.params import declared_params, lookup, stage_params

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _stages():
    """Every stage as DVC names it: a foreach stage over a params list (`${compare.methods}`) gives
    `name@item` for every item of that list."""
    for name, spec in DVC["stages"].items():
        if "foreach" in spec:
            ref = re.fullmatch(r"\$\{([\w.]+)\}", spec["foreach"])
            assert ref, f"stage {name}: foreach {spec['foreach']!r} is not a params list"
            yield from (f"{name}@{m}" for m in lookup(PARAMS, ref.group(1)))
        else:
            yield name


@pytest.mark.parametrize("stage", list(_stages()))
def test_stage_reads_only_declared_params(stage):
    name, _, item = stage.partition("@")
    spec = DVC["stages"][name]["do"] if item else DVC["stages"][name]
    cmd = re.fullmatch(r"python -m stages\.(\w+)( \$\{item\})?((?: --[\w-]+ \S+)*)", spec["cmd"])
    assert cmd, f"stage {stage}: cmd {spec['cmd']!r} is not `python -m stages.NAME [--opt value ...]`"
    module, args = cmd.group(1), dict(re.findall(r"--([\w-]+) (\S+)", cmd.group(3)))
    source = (ROOT / "stages" / f"{module}.py").read_text()
    if "method" in args:  # stages.unlearncanvas: --stage <benchmark> --method base | <method>
        method = args["method"].replace("${item}", item)
        assert (f"{args['stage']}_base" if method == "base" else f"{args['stage']}@{method}") == stage
        assert "stage_params(run_name)" in source and 'run_name = f"{args.stage}_base" if args.method == "base" else f"{args.stage}@{args.method}"' in source
    elif "stage_params(f\"{args.stage}_report\")" in source:  # stages.unlearncanvas_report: --stage <benchmark>
        assert f"{args['stage']}_report" == stage
    elif "stage" in args or 'stage_params(args.stage)' in source:  # one script serving several stages, named by --stage
        assert 'stage_params(args.stage)' in source
        assert args.get("stage", re.search(r'add_argument\("--stage", default="(\w+)"\)', source).group(1)) == stage
    else:
        assert (f'stage_params(f"{name}@{{' if item else f'stage_params("{stage}")') in source
    declared = declared_params(DVC, stage)
    if item:
        assert any(d == item or d.endswith("." + item) for d in declared)  # the method's own params section
    for key in declared:
        lookup(PARAMS, key)  # raises KeyError if params.yaml lacks a declared key
    read = re.findall(r'\bp\("([\w.]+)"', source)
    assert read, f"stage {stage} reads no params?"
    for key in read:
        assert any(key == d or key.startswith(d + ".") for d in declared), f"{stage} reads undeclared {key}"


def test_undeclared_read_fails_loudly():
    p = stage_params("base_model", ROOT)
    assert p("model.arch")
    with pytest.raises(UnlearnError, match="does not declare"):
        p("data.source")


def test_unknown_config_key_is_one_line():
    from unlearn.data.synthetic import SyntheticConfig
    from unlearn.params import as_config

    assert as_config(SyntheticConfig, {"seed": 4}, "data.synthetic").seed == 4
    with pytest.raises(UnlearnError, match="data.synthetic has unknown keys shardz"):
        as_config(SyntheticConfig, {"shardz": 4}, "data.synthetic")


def test_exponent_floats_set_by_dvc_exp_run_reach_stages_as_numbers(tmp_path):
    """`dvc exp run -S ga.lr=1e-5` writes `lr: 1e-05` (DVC dumps YAML 1.2), which PyYAML alone reads
    as the string "1e-05": the params check would refuse a learning rate the user wrote correctly."""
    from dvc.utils.hydra import apply_overrides

    from unlearn.params import load_yaml
    from unlearn.ranges import check_ranges

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    apply_overrides(str(tmp_path / "params.yaml"), ["ga.lr=1e-5", "unlearncanvas.esd.lr=7e-5", "slug.search.damping=1E-5"])
    as_pyyaml_reads_it = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert as_pyyaml_reads_it["ga"]["lr"] == "1e-05"  # the case is real: the checks below would refuse it
    with pytest.raises(UnlearnError, match="slug.search.damping is '1e-05'"):
        check_ranges(as_pyyaml_reads_it)
    params = load_yaml(tmp_path / "params.yaml")
    assert (params["ga"]["lr"], params["unlearncanvas"]["esd"]["lr"], params["slug"]["search"]["damping"]) == (1e-5, 7e-5, 1e-5)
    check_ranges(params)
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    assert stage_params("compare_run@ga", tmp_path)("ga.lr") == 1e-5


def test_committed_yaml_reads_as_pyyaml_reads_it():
    """The YAML 1.2 floats change nothing in the committed params.yaml and dvc.yaml."""
    from unlearn.params import parse_yaml

    for name in ("params.yaml", "dvc.yaml"):
        text = (ROOT / name).read_text()
        assert parse_yaml(text) == yaml.safe_load(text)
    assert [parse_yaml(t) for t in ("1e-05", "-2E+3", ".5e-2", "1.0e-4", "12", "1e", "e5", "1e-5x")] == [1e-5, -2000.0, 0.005, 1e-4, 12, "1e", "e5", "1e-5x"]


@pytest.mark.parametrize("value, message", [("1e-5x", "ga.lr is '1e-5x'; it must be a number"), (True, "ga.lr is True; it must be a number"),
                                            (None, "ga.lr is None; it must be a number")])
def test_a_config_number_that_is_not_one_is_a_one_line_error(value, message):
    from unlearn.methods.registry import methods

    with pytest.raises(UnlearnError, match=re.escape(message)):
        methods()["ga"].config({**PARAMS["ga"], "lr": value}, "ga")
    with pytest.raises(UnlearnError, match=re.escape("ga.epochs is 2.5; it must be an integer")):
        methods()["ga"].config({**PARAMS["ga"], "epochs": 2.5}, "ga")
    assert methods()["ga"].config({**PARAMS["ga"], "lr": 1}, "ga").lr == 1  # an integer is a number


def test_a_config_declared_without_postponed_annotations_is_checked_too():
    """`as_config` reads `int`/`float` declarations as strings (postponed annotations, as in this
    project) and as classes (a module without `from __future__ import annotations`)."""
    import dataclasses

    from unlearn.params import as_config

    Config = dataclasses.make_dataclass("Config", [("lr", float), ("epochs", int), ("scale", "float | None", dataclasses.field(default=None))])
    assert as_config(Config, {"lr": 1e-5, "epochs": 2}, "x").lr == 1e-5
    assert as_config(Config, {"lr": 1, "epochs": 2, "scale": None}, "x").scale is None
    for values, message in (({"lr": "1e-5x", "epochs": 2}, "x.lr is '1e-5x'; it must be a number"),
                            ({"lr": 1e-5, "epochs": True}, "x.epochs is True; it must be an integer"),
                            ({"lr": 1e-5, "epochs": 2, "scale": "big"}, "x.scale is 'big'; it must be a number")):
        with pytest.raises(UnlearnError, match=re.escape(message)):
            as_config(Config, values, "x")
