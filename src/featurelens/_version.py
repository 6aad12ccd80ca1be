"""The version of featurelens, in a module that imports nothing.

pyproject.toml reads it from here. Modules that record the version (the atlas manifest,
``featurelens --version``) import it from here rather than from the package.
"""

__version__ = "0.1.0"
