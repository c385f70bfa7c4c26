"""pgml-proxy's model engine. The proxy imports only :mod:`engine.api`."""
