"""Errors shared by the package's entry points."""


class InputError(ValueError):
    """What a run would read is missing or wrong (raised before anything is written); the message names the flag
    or file to fix."""
