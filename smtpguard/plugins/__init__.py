"""Where smtpguard finds scanner, policy and notifier factories.

Other distributions add theirs by shipping a module in a ``smtpguard/plugins/``
directory of their own (without an ``__init__.py``): the path extension below
makes every such directory on ``sys.path`` part of this package.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
