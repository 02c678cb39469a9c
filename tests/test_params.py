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
