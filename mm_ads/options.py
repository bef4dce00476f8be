"""The one way between an options dataclass and command-line flags, flagfile values and back.

* `convert_value`: a flag's value (flagfile string or parsed) as the type of its dataclass field.
* `define_flag`: the absl flag of one field, typed by its default (`mm_ads.flags` generates `mm_ads.train`'s
  flags with it).
* `options_from_values` / `define_flags` / `options_from_flags`: a whole options dataclass with `validate()`
  and `from_values()` (the reports', the encoder service's, the near-line trainer's and the prediction
  server's options) from `{name: value}` or from the command line.
* `field_help`: each field's help text: its `metadata={"help": ...}`, else its entry in the dataclass
  docstring's `Args:` / `Attributes:` section — the flag's `--help` is what the docstring says.

`mm_ads.config.config_from_values` builds the training config with `convert_value`; `mm_ads.config.read_flagfile`
reads flagfiles.
"""

import dataclasses
import inspect
import re

_SECTIONS = ("Args:", "Attributes:")
_ENTRY = re.compile(r"^(\w+(?: / \w+)*)(?: \([^)]*\))?: ?(.*)$")  # "name: text", "a / b: text"


def field_help(cls):
    """`{field: help text}` of a dataclass: a field's `metadata["help"]`, else its entry in the class docstring's
    Google-style `Args:` or `Attributes:` section (`name: text`, or `a / b: text` for fields described
    together; continuation lines indented deeper, joined with spaces). Fields described nowhere are absent."""
    out = {}
    lines = (inspect.getdoc(cls) or "").splitlines()
    section, entry_indent, name = False, None, None
    for line in lines:
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if stripped in _SECTIONS and indent == 0:
            section, entry_indent, name = True, None, None
            continue
        if not section:
            continue
        if not stripped:
            name = None
            continue
        if indent == 0:  # the section ended
            section, name = False, None
            continue
        if entry_indent is None:
            entry_indent = indent
        match = _ENTRY.match(stripped) if indent == entry_indent else None
        if match:
            name = tuple(match.group(1).split(" / "))
            for n in name:
                out[n] = match.group(2)
        elif name is not None and indent > entry_indent:
            for n in name:
                out[n] = f"{out[n]} {stripped}".strip()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {k: v for k, v in out.items() if k in fields}
    out.update({k: f.metadata["help"] for k, f in fields.items() if f.metadata.get("help")})
    return out


def convert_value(name, default, value, float_sequences=()):
    """A flag's value (a flagfile string, a parsed absl value or a typed value) as the type of the field's
    `default`: bool, int, float, str, or a tuple of ints (of floats for the names in `float_sequences`).
    ValueError naming `--name` when it cannot be read."""
    element = float if name in float_sequences else int
    if isinstance(value, str):
        text = value.strip()
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{name} must be true or false, got {value!r}")
            return text.lower() in ("true", "1")
        try:
            if isinstance(default, int):
                return int(text)
            if isinstance(default, float):
                return float(text)
            if isinstance(default, tuple):
                return tuple(element(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--{name}: cannot read {value!r} as {type(default).__name__}") from None
        return text
    if isinstance(default, tuple):  # a parsed list flag or a typed sequence
        try:
            return tuple(element(v) for v in value)
        except ValueError:
            raise ValueError(f"--{name} must be comma-separated {element.__name__}s, got {list(value)!r}") from None
    return value


def define_flag(name, default, help_text, float_sequence=False):
    """The absl flag `--name` typed by `default` (bool, int, float, comma-separated list, or string)."""
    from absl import flags

    if isinstance(default, bool):
        return flags.DEFINE_bool(name, default, help_text)
    if isinstance(default, int):
        return flags.DEFINE_integer(name, default, help_text)
    if isinstance(default, float):
        return flags.DEFINE_float(name, default, help_text)
    if isinstance(default, tuple):
        kind = "floats" if float_sequence else "strings" if default and isinstance(default[0], str) else "ints"
        return flags.DEFINE_list(name, [str(v) for v in default], help_text + f" Comma-separated {kind}.")
    return flags.DEFINE_string(name, default, help_text)


def options_from_values(cls, values, what):
    """A validated `cls` (a dataclass with `validate()`) from `{field: value}` (flagfile strings or typed values).

    Tuple fields take comma-separated strings (ints when the default holds ints); unknown names are an error
    naming `what`.
    """
    values = dict(values)
    defaults = cls()
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, default = values.pop(f.name), getattr(defaults, f.name)
        if isinstance(default, tuple) and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(default, tuple) and default and isinstance(default[0], int):
            try:
                value = tuple(int(v) for v in value)
            except ValueError:
                raise ValueError(f"--{f.name} must be comma-separated integers, got {value!r}") from None
        out[f.name] = tuple(value) if isinstance(default, tuple) else convert_value(f.name, default, value)
    if values:
        raise ValueError(f"Unknown {what} options: {sorted(values)}")
    return cls(**out).validate()


def define_flags(cls, what, output_help=None):
    """absl flags for every field of `cls` (`define_flag`; the help is `field_help`'s, else names the dataclass),
    plus a required `--output_dir` when `output_help` is given (entry points only)."""
    from absl import flags

    defaults = cls()
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        help_text = helps.get(f.name) or f"{what} option {f.name} (see {cls.__module__}.{cls.__name__})."
        define_flag(f.name, getattr(defaults, f.name), help_text)
    if output_help:
        flags.DEFINE_string("output_dir", None, output_help, required=True)


def options_from_flags(cls):
    """`options_from_values` of the flags given on the command line (or in a flagfile); UsageError if invalid."""
    from absl import app, flags

    values = {f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(cls) if flags.FLAGS[f.name].present}
    try:
        return cls.from_values(values)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
