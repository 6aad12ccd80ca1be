"""The version of featurelens, in a module that imports nothing.

Modules that record the version (the atlas manifest, ``featurelens --version``) import it from
here rather than from the package, whose ``__init__`` imports every module.
"""

__version__ = "0.1.0"
