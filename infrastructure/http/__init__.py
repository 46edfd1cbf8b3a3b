"""daybook over HTTP: the ASGI application behind ``daybook serve``."""
