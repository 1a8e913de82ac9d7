"""Imported by the warm-start forkserver only (see ``postload._warm_start``)."""

from postload._warm_start import preload

preload()
