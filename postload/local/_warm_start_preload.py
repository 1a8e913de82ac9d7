"""Imported by the warm-start forkserver only (see ``postload.local._warm_start``)."""

from postload.local._warm_start import preload

preload()
