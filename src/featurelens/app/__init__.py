"""The explorer: watch every channel of a layer react to an input, in the browser.

In the spirit of the Deep Visualization Toolbox (Yosinski et al., 2015): pick a layer and an input
(a dataset example or an uploaded image), see the activation maps of every channel, click one to
see its Zeiler-Fergus grid from the atlas and its projection on the current input, hover a map to
see the receptive field of a location.

The logic is :class:`featurelens.explorer.Explorer` (no web imports); this package is its web
side. :func:`create_app` (:mod:`featurelens.app.http`) returns the ASGI application;
:func:`serve` (:mod:`featurelens.app.server`) runs it with uvicorn in a background thread
(notebooks) and returns a handle with ``.url`` and ``.stop()``.
"""

from featurelens.app.http import create_app
from featurelens.app.server import ExplorerServer, serve
from featurelens.explorer import Explorer

__all__ = ["Explorer", "ExplorerServer", "create_app", "serve"]
