import pytest

from sfumato.errors import ParamError
from sfumato.params import GenerationParams, canonical_sampler, canonical_scheduler


def test_defaults_validate_and_names_are_normalised():
    p = GenerationParams("x", sampler="dpm++ 2m", scheduler="Karras").validated()
    assert (p.sampler, p.scheduler) == ("DPM++ 2M", "karras")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("steps", 0, "steps must be between 1 and 150"),
        ("steps", 2.5, "steps must be an integer"),
        ("width", 100, "multiple of 8"),
        ("height", 8, "at least 64"),
        ("cfg_scale", -1, "cfg_scale must be between"),
        ("batch_size", 0, "batch_size must be between"),
        ("seed", -2, "seed must be between -1"),
        ("clip_skip", 0, "clip_skip"),
        ("denoising_strength", 1.5, "denoising_strength"),
        ("sampler", "Heun++", "allowed: Euler, Euler a"),
        ("scheduler", "cosine", "allowed: normal, karras"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(field, value, needle):
    with pytest.raises(ParamError, match=needle.replace("+", r"\+")):
        GenerationParams("x", **{field: value}).validated()


def test_random_seed_is_resolved_and_reported():
    p = GenerationParams("x").with_seed()
    assert 0 <= p.seed < 2**32
    assert GenerationParams("x", seed=5).with_seed().seed == 5


def test_old_a1111_karras_sampler_names_are_accepted():
    assert canonical_sampler("DPM++ 2M Karras") == "DPM++ 2M"
    assert canonical_scheduler("Automatic") == "karras"


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ParamError, match="unknown parameter"):
        GenerationParams.from_dict({"prompt": "x", "stepz": 3})
    assert GenerationParams.from_dict({"prompt": "x", "loras": [["a", 1, 1]]}).loras == (("a", 1, 1),)
