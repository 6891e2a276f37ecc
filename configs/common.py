"""Every default in one place; the other files here import it and change only what differs.

The defaults live in the package (`bertjax.config.defaults`), so that bertjax never depends on
these experiment files; this module keeps `from configs import common` working for them.
"""

from bertjax.config.defaults import config_args, get_config

__all__ = ["config_args", "get_config"]
