"""Python package imported by the bundle's configs: only what MONAI lacks for registration."""

import os
import sys


def bundle_root() -> str:
    """Absolute path of the bundle folder (the parent of this package), whatever the working directory.

    Configs call it through ``_target_`` rather than ``$import scripts``: MONAI puts the bundle on ``sys.path`` only
    when the run starts, after the config's imports have been evaluated.
    """
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


MONAI_WRAPPERS = ("Failed to evaluate", "Failed to instantiate")


def _specific_error(error: BaseException) -> BaseException:
    """The first error in ``error``'s chain that is not one of MONAI's config wrappers ("Failed to evaluate
    ConfigExpression", "Failed to instantiate component"), i.e. the one whose message states the problem."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not (isinstance(current, RuntimeError) and str(current).startswith(MONAI_WRAPPERS)):
            return current
        current = current.__cause__ or current.__context__
    return error


def _excepthook(kind, error, traceback) -> None:
    """Print the traceback as Python does, then the specific error again as the last line.

    MONAI's bundle runner wraps every error of a config expression in ``RuntimeError: Failed to evaluate
    ConfigExpression`` and a job scheduler that keeps the tail of the log would lose the real message, which sits
    in the middle of 70-130 lines of traceback.
    """
    _previous_excepthook(kind, error, traceback)
    specific = _specific_error(error)
    if specific is not error:
        sys.stderr.write(f"ERROR: {type(specific).__name__}: {specific}\n")


_previous_excepthook = sys.excepthook
sys.excepthook = _excepthook
