"""taopd."""
