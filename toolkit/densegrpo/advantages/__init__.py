"""Built-in advantages."""
