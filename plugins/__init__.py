"""zenalign's built-in plugins, importable as ``zenalign_plugins``.

Each module is written exactly like a third-party plugin: ``@hookimpl`` functions returning
plugin types, registered through the ``zenalign`` entry-point group in pyproject.toml.
"""
