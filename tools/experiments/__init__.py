"""Experiments that decided the package's defaults (each module's docstring has its command)."""


def parse_overrides(setting):
    """`"a=1,b=x"` → `{"a": "1", "b": "x"}` (flag name → value string, as in a flagfile)."""
    return dict(item.split("=", 1) for item in setting.split(",") if item)
