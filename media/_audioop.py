"""``audioop``: the stdlib module below Python 3.13, the audioop-lts package from 3.13 on."""
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # noqa: F401

__all__ = ["audioop"]
