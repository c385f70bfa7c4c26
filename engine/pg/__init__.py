"""PostgreSQL's formats: type OIDs, values as text and binary, COPY data, decoded tables, and the pgml registry rows.

The value-format modules (``types``, ``scalars``, ``text``, ``binary``, ``copy``, ``fields``, ``table``) are shared
by the proxy and the engine; they import only ``engine.api``, each other and numpy (and pyarrow, on first use, for
text read from binary COPY).
"""
