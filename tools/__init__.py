"""Tools built on hybrid."""
