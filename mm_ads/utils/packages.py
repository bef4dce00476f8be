"""Files shipped inside installed Python packages (the pretrained weights that `make setup` installs)."""

import importlib.util
import os


def installed_file(package, *parts, directory=False):
    """The path `<package dir>/<parts...>` of the installed `package` when it exists (a directory with
    `directory`, else a file), or "" when the package is not installed or does not ship it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return ""
    path = os.path.join(os.path.dirname(spec.origin), *parts)
    return path if (os.path.isdir(path) if directory else os.path.isfile(path)) else ""
