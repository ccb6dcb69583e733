"""loralab's version, read from the installed package's metadata (``pyproject.toml`` is the one place it is written).

Its own module so that ``io`` (which records the version in every adapter it saves) need not import the package's
``__init__``, which imports ``io``.
"""

from importlib import metadata

try:
    __version__ = metadata.version("loralab")
except metadata.PackageNotFoundError:  # a source tree put on sys.path without being installed
    __version__ = "0+unknown"
