"""Python package imported by the bundle's configs: only what MONAI lacks for registration."""

import os


def bundle_root() -> str:
    """Absolute path of the bundle folder (the parent of this package), whatever the working directory.

    Configs call it through ``_target_`` rather than ``$import scripts``: MONAI puts the bundle on ``sys.path`` only
    when the run starts, after the config's imports have been evaluated.
    """
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
