"""Built-in toy."""
