"""Repository-level pytest configuration: pytester for testing the plugin itself."""

pytest_plugins = ["pytester"]
