"""
The package ``twisted.plugin.getPlugins`` searches for filter plugins.

Its ``__path__`` takes in, besides this directory (the first-party
filters), the ``proxyframe/plugins`` directories of every other entry on
``sys.path`` (so an installed third-party distribution that ships a module
there is found with no change to proxyframe), and at start the directories
listed in the config's ``plugin_paths`` (drop-in ``.py`` files).
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
