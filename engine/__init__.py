"""pgml-proxy's model engine.

``engine.api`` is the seam (interface, catalogue, config, errors); ``engine.pg`` PostgreSQL's value formats
and the registry rows; ``engine.runtime`` the executor and what handlers run with; ``engine.nlp`` the text
functions and fine-tuning; ``engine.ml`` the classical models. The proxy imports ``engine.api`` and
``engine.pg``'s value formats; only its composition root (``proxy.cli``) imports the executor.
"""
