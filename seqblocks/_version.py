"""The installed version of seqblocks (its own module, so code at any layer can read it)."""

__version__ = "0.1.0"
