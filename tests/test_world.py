import re
from collections import Counter

from unlearn.data import synthetic as S
from unlearn.data.world import IDENTITIES, LOOKALIKES, NEAR_MISSES, OBJECTS, STYLES, check_world, identity


def test_world_tables_hold_the_required_concepts():
    check_world()
    names = {i.name for i in IDENTITIES}
    assert {"Elon Musk", "Taylor Swift", "Jeff Bezos", "Kim Kardashian", "Mark Zuckerberg"} <= names
    assert "Mickey" in {o.name for o in OBJECTS}
    assert len(IDENTITIES) >= 24 and len(OBJECTS) >= 12 and len(STYLES) >= 8


def test_lookalikes_share_all_but_two_features():
    for a, b in LOOKALIKES:
        assert identity(a).face.distance(identity(b).face) == 2


def test_samples_cover_every_kind_with_noisy_captions():
    samples = [S.make_sample(0, 0, i) for i in range(600)]
    kinds = Counter(kind for _, _, kind in samples)
    assert set(kinds) == set(S.MIX), kinds
    captions = [c for _, c, _ in samples]
    assert any("'s " in c for c in captions), "possessive captions expected"
    assert any("_" in c and c.endswith(".jpg") for c in captions), "file-name style captions expected"
    assert any(c.isupper() for c in captions), "upper-case captions expected"
    near = [n for ns in NEAR_MISSES.values() for n in ns]
    assert any(any(n in c for n in near) for c in captions), "near-miss names expected"
    # several identities in one caption
    name_re = re.compile("|".join(re.escape(i.name) for i in IDENTITIES))
    assert any(len(set(name_re.findall(c))) >= 2 for c in captions)


def test_same_sample_same_pixels_and_caption():
    a, b = S.make_sample(5, 1, 7), S.make_sample(5, 1, 7)
    assert a[1] == b[1] and a[0].tobytes() == b[0].tobytes()
    c = S.make_sample(6, 1, 7)
    assert c[0].tobytes() != a[0].tobytes()
