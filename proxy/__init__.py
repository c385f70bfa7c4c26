"""pgml-proxy: the PostgresML ``pgml.*`` SQL API for any unmodified PostgreSQL, as a wire-protocol proxy."""

__version__ = "0.1.0"
# The PostgresML release whose SQL API this proxy implements.
PGML_API_LEVEL = "2.10.0"
