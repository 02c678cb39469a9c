"""Stage `check`: the names params.yaml picks (`model.family`, `concept`, `compare.concepts`,
`compare.methods`, `forget_many.concepts`, `slug.search.direction` and `.fallback`, `vlm.concept`, an identity) are
known, `vlm.template` holds the image token, `gradients.nproc` is a process count, and every
numeric param is in its range (`unlearn.ranges`), before any other stage runs.

Every stage is downstream of this one (stage `download` depends on its stamp), so
`dvc exp run -S concept=Elon Mask` or `-S 'compare.methods=[slug,salun2]'` stops here with the
known names, in seconds, instead of after the data or the model was rebuilt.  The stamp's content
does not depend on the params, so a valid change of concept reruns this check and nothing else
upstream of `curate`.
"""

from __future__ import annotations

import logging

from unlearn.cli import run_stage
from unlearn.data.curate import resolve_concept, resolve_concepts
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs, write_json
from unlearn.methods import check_direction, check_fallback
from unlearn.methods.registry import check_methods
from unlearn.methods.slug import SearchConfig
from unlearn.models.adapter import check_family
from unlearn.params import as_config, stage_params
from unlearn.ranges import KEYS, check_ranges
from unlearn.vlm.prompt import check_template

STAMP = "data/checked.json"
log = logging.getLogger("check")


def main() -> None:
    p = stage_params("check")
    check_ranges(p)
    family = check_family(str(p("model.family")))
    table = p("concepts")
    concept = resolve_concept(str(p("concept")), table)
    concepts = resolve_concepts(p("compare.concepts"), table)
    methods = check_methods(p("compare.methods"))
    resolve_concepts(p("forget_many.concepts"), table, "forget_many.concepts")
    check_direction(p("slug.search.direction"), p("slug.search.damping"))
    check_fallback(p("slug.search.fallback"))
    # widen_to an integer >= 0 (its RANGES); moments shared or kept, kept with the preconditioned direction only
    as_config(SearchConfig, {"widen_to": p("slug.search.widen_to"), "moments": p("slug.search.moments"), "direction": p("slug.search.direction"),
                             "damping": p("slug.search.damping")}, "slug.search")
    vlm = resolve_concept(str(p("vlm.concept")), table)
    if vlm.kind != "identity":
        raise UnlearnError(f"vlm.concept {vlm.name!r} is an {vlm.kind}; the VLM track forgets an identity of the table")
    check_template(str(p("vlm.template")))
    nproc = p("gradients.nproc")
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise UnlearnError(f"params.yaml gradients.nproc is {nproc!r}; it must be an integer >= 1 (1: one process; README \"Past one machine\")")
    with atomic_outputs(STAMP) as (stamp,):
        write_json(stamp, {"checked": ["model.family", "concept", "compare.concepts", "compare.methods", "forget_many.concepts",
                                       "slug.search.direction", "gradients.nproc", *KEYS]})
    log.info("%s model; concept %s (%s); compare: %d concepts x %s", family, concept.name, concept.kind, len(concepts), ", ".join(methods))


if __name__ == "__main__":
    run_stage("check", main)
