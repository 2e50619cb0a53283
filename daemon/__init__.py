"""berthd process: config, aiohttp app (control API, data plane), CLI."""
