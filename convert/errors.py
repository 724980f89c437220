"""The converter's error type: bad input (checkpoint, config, options); the message names the problem."""

import importlib


class ConversionError(Exception):
    pass


def require_extra(module: str, what: str):
    """Import `module` of the `convert` extra, or say in one line which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConversionError(
            f"{what} needs the {module} package: pip install 'ferrisres[convert]' (a runtime-only install lacks it)"
        ) from None
