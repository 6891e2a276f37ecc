"""Every default in one place; the other files here import it and change only what differs.

The defaults live in the package (`bertjax.config.defaults`), so that bertjax never depends on
these experiment files; this module keeps `from configs import common` working for them.
"""

from bertjax.config.defaults import get_config, parse_arg

__all__ = ["get_config", "parse_arg"]
