"""berthd process: config, aiohttp app (control API, data plane), CLI.

First thing: the compiled build of the data plane's hot modules goes first on this package's
path when it matches the sources (daemon/native.py)."""

from berth.daemon.native import enable

enable(__path__)
