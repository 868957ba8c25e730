"""Built-in e2kd plugins (import name ``e2kd_plugins``).

Each module is an entry point of the group ``e2kd`` in e2kd's ``pyproject.toml`` and is
discovered exactly like a third-party plugin; the core never imports these modules.
"""
