import random
import re
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from sfumato.world.captions import (
    Expectation,
    ObjectQuery,
    RelationQuery,
    caption,
    check,
    describe,
    full_expectation,
    plain_caption,
)
from sfumato.world.scenes import COLORS, SPLITS, ObjectSpec, Scene, sample_scene, sample_scenes

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
SCENERY_COLORS = {"gradient sky": {"blue"}, "grass and sky": {"blue", "green"}}  # "a blue sky"


def noun_forms(shape):
    return (shape, shape + "s", shape + "es")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from(SPLITS))
def test_every_caption_is_true_of_its_scene(seed, split):
    rng = random.Random(seed)
    scene = sample_scene(rng, split)
    text, expectation = describe(scene, rng)
    claims = check(expectation, scene.objects, scene.background)
    assert claims and all(claims.values()), (text, claims)
    # every object of the scene is accounted for, and the words say what the claims say
    assert sum(q.count for q in expectation.objects) == len(scene.objects)
    words = re.findall(r"[a-z-]+", text)
    for query in expectation.objects:
        assert any(form in words for form in noun_forms(query.shape)), text
        if query.color:
            assert query.color in words, text
        if query.count > 1:
            assert NUMBER_WORDS[query.count] in words, text
    named_colors = {w for w in words if w in COLORS}  # never a colour the scene lacks
    shown = {o.color for o in scene.objects} | {scene.background}
    assert named_colors <= shown | SCENERY_COLORS.get(scene.background, set()), text
    assert not re.search(r"\ba [aeiou]", text), text


def test_captions_are_deterministic_and_varied():
    scenes = sample_scenes(3, 300, "train")
    first = [caption(s, random.Random(i)) for i, s in enumerate(scenes)]
    assert first == [caption(s, random.Random(i)) for i, s in enumerate(scenes)]
    text = " ".join(first)
    for phrase in ("a single", "one ", "two ", "left of", "above", "below", "next to", "beside",
                   "night", "grassy", "background", "striped", "with dots", "small", "large"):
        assert phrase in text, phrase


def test_false_claims_are_caught():
    scene = Scene("night", (ObjectSpec("circle", "red", "medium", 0.25, 0.5),
                            ObjectSpec("square", "blue", "medium", 0.75, 0.5, "striped")))
    exp = full_expectation(scene)
    assert all(check(exp, scene.objects, scene.background).values())
    circle, square = exp.objects
    wrong = [
        replace(exp, background="green"),
        replace(exp, objects=(replace(circle, color="blue"), square)),
        replace(exp, objects=(circle, replace(square, pattern="dotted"))),
        replace(exp, objects=(replace(circle, count=2), square)),
        replace(exp, objects=(replace(circle, shape="star"), square)),
        Expectation(objects=(circle, square), relations=(RelationQuery(0, "right of", 1),)),
        Expectation(objects=(circle, square), relations=(RelationQuery(0, "above", 1),)),
    ]
    for expectation in wrong:
        assert not all(check(expectation, scene.objects, scene.background).values()), expectation
    right = Expectation(objects=(circle, square), relations=(RelationQuery(0, "left of", 1),))
    assert all(check(right, scene.objects, scene.background).values())


def test_negated_attributes():
    scene = Scene("white", (ObjectSpec("circle", "red", "large", 0.5, 0.5),))
    kinds = {c.kind: v for c, v in check(Expectation(objects=(ObjectQuery("circle", "!red"),)),
                                         scene.objects, scene.background).items()}
    assert kinds == {"shape": True, "color": False}
    assert all(check(Expectation(objects=(ObjectQuery("circle", "!blue"),)),
                     scene.objects, scene.background).values())


def test_swap_word_swaps_the_first_word_of_its_kind_in_the_same_number():
    import random

    from sfumato.world.captions import swap_word
    from sfumato.world.scenes import SHAPES

    rng = random.Random(0)
    swapped = swap_word("two red crosses above a blue star", SHAPES, rng)
    first, rest = swapped.split(" above ")
    assert rest == "a blue star" and first.startswith("two red ") and first.endswith("s")
    assert first != "two red crosses" and first.removeprefix("two red ") not in ("cross", "crosss")
    single = swap_word("a green star", SHAPES, rng)
    assert single.startswith("a green ") and single.removeprefix("a green ") in SHAPES
    assert single != "a green star"
    assert swap_word("a plain blue background", SHAPES, rng) is None


def test_hard_negatives_never_name_a_held_out_concept():
    import random

    from sfumato.train.clip import hard_negative
    from sfumato.world.scenes import held_out

    rng, concepts = random.Random(0), held_out().concept_shapes
    swapped = {hard_negative("a red star above a blue circle", rng).split()[2] for _ in range(200)}
    assert swapped and not swapped & concepts and len(swapped) > 3


def test_a_relation_swaps_to_its_opposite_and_a_number_to_another_number():
    import random

    from sfumato.world.captions import SWAP_KINDS, swap_word

    rng = random.Random(0)
    relation = SWAP_KINDS["relation"]
    assert swap_word("a red star to the left of a blue circle", relation, rng) == "a red star to the right of a blue circle"
    assert swap_word("a red star below a blue circle", relation, rng) == "a red star above a blue circle"
    assert swap_word("a red star next to a blue circle under a night sky", relation, rng) is None
    numbers = {swap_word("three red stars on white", SWAP_KINDS["number"], rng).split()[0] for _ in range(50)}
    assert numbers == {"two", "four"}


def test_hard_negatives_swap_the_first_kind_of_the_list_a_caption_has():
    import random

    import pytest

    from sfumato.errors import SfumatoError
    from sfumato.train.clip import hard_negative, hard_negative_kinds

    rng = random.Random(0)
    kinds = hard_negative_kinds(["relation", "number", "shape"])
    assert hard_negative("two red stars above a blue circle", rng, kinds) == "two red stars below a blue circle"
    assert hard_negative("two red stars and a blue circle", rng, kinds).split()[0] in ("three", "four")
    assert hard_negative("a red star", rng, kinds).split()[2] != "star"
    assert hard_negative("a plain blue background", rng, kinds) is None
    assert hard_negative_kinds(True) == ("shape", "colour") and hard_negative_kinds(False) == ()
    with pytest.raises(SfumatoError, match="'size'.*allowed true, false or a list of shape, colour, relation"):
        hard_negative_kinds(["relation", "size"])


def test_a_plain_caption_names_every_object_and_the_background_in_one_wording():
    star = ObjectSpec("star", "red", "large", 0.5, 0.5)
    assert plain_caption(Scene("white", (star,))) == "a large red star on a white background"
    night = Scene("night", (ObjectSpec("ring", "orange", "small", 0.2, 0.2),
                            ObjectSpec("square", "pink", "medium", 0.7, 0.7, "striped"), star))
    assert plain_caption(night) == "a small orange ring, a medium pink striped square and a large red star under a night sky"


def test_a_plain_caption_of_a_lined_up_pair_names_how_it_lies():
    star, circle = ObjectSpec("star", "red", "large", 0.25, 0.5), ObjectSpec("circle", "blue", "large", 0.75, 0.52)
    assert plain_caption(Scene("white", (star, circle))) == \
        "a large red star to the left of a large blue circle on a white background"
    assert plain_caption(Scene("white", (circle, star))) == \
        "a large blue circle to the right of a large red star on a white background"
    low = ObjectSpec("circle", "blue", "large", 0.27, 0.8)
    assert plain_caption(Scene("white", (star, low))).startswith("a large red star above a large blue circle")
    unclear = ObjectSpec("circle", "blue", "large", 0.45, 0.62)  # neither beside nor above: no relation said
    assert plain_caption(Scene("white", (star, unclear))) == "a large red star and a large blue circle on a white background"
