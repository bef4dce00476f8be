"""`mm_ads.options`: the one way between option dataclasses, flag values and flags."""

import dataclasses

import pytest

from mm_ads import options
from mm_ads.options import convert_value, options_from_values


def test_convert_value_types_by_the_default():
    assert convert_value("epochs", 1, " 3 ") == 3
    assert convert_value("lr", 0.1, "0.5") == 0.5
    assert convert_value("export", True, "false") is False and convert_value("export", False, "1") is True
    assert convert_value("units", (80, 40), "200,80,") == (200, 80)
    assert convert_value("bounds", (), "0.1,0.5", float_sequences=("bounds",)) == (0.1, 0.5)
    assert convert_value("units", (80, 40), ["3", "4"]) == (3, 4)  # a parsed list flag
    assert convert_value("name", "a", "b") == "b"
    with pytest.raises(ValueError, match=r"--export must be true or false, got 'yes'"):
        convert_value("export", True, "yes")
    with pytest.raises(ValueError, match=r"--epochs: cannot read 'x' as int"):
        convert_value("epochs", 1, "x")
    with pytest.raises(ValueError, match=r"--units must be comma-separated ints"):
        convert_value("units", (1,), ["a"])


@dataclasses.dataclass
class _Options:
    seeds: tuple = (0, 1)
    variants: tuple = ("id",)
    name: str = "x"
    steps: int = 5

    def validate(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")
        return self


def test_options_from_values_reads_lists_and_names_unknown_options():
    got = options_from_values(_Options, {"seeds": "3, 4", "variants": "id,make", "steps": "7"}, "test")
    assert got == _Options(seeds=(3, 4), variants=("id", "make"), name="x", steps=7)
    with pytest.raises(ValueError, match=r"Unknown test options: \['bogus'\]"):
        options_from_values(_Options, {"bogus": "1"}, "test")
    with pytest.raises(ValueError, match="--seeds must be comma-separated integers"):
        options_from_values(_Options, {"seeds": "a"}, "test")
    with pytest.raises(ValueError, match="steps must be >= 0"):
        options_from_values(_Options, {"steps": "-1"}, "test")


@dataclasses.dataclass
class _Documented:
    """Options for a test.

    Some prose that is not a section.

    Args:
        alpha: the first
            option, over two lines.
        beta / gamma: described together.
        delta (int): with a type.
        not_a_field: ignored.

    Returns:
        omega: not an option.
    """

    alpha: int = 1
    beta: float = 0.5
    gamma: float = 0.5
    delta: int = 0
    epsilon: str = dataclasses.field(default="", metadata={"help": "from the metadata."})
    zeta: str = ""


def test_field_help_reads_the_docstring_and_the_metadata():
    assert options.field_help(_Documented) == {
        "alpha": "the first option, over two lines.",
        "beta": "described together.",
        "gamma": "described together.",
        "delta": "with a type.",
        "epsilon": "from the metadata.",
    }


def test_every_training_flag_has_its_docstring_help():
    from mm_ads import config as config_lib

    for _, kind in config_lib.SECTION_KINDS:
        helps = options.field_help(kind)
        assert [f.name for f in dataclasses.fields(kind) if not helps.get(f.name)] == [], kind.__name__
