"""Rewriting statements that call ``pgml.*``, without I/O: decisions are generators of requests.

``decide`` (the seam: one decision per Query/Parse/Bind) -> ``analyze`` (parse, call sites, schema
use) -> ``evaluate`` (order of evaluation) -> ``constant`` (constant calls to literals) and
``per_row`` (gather, temp table, lookup; ``gather`` builds the query, ``overloads`` picks the
overload); ``deferred`` (statements whose calls read ``$n``: analysed once, rewritten per Bind),
``sql_prepare`` (SQL EXECUTE), ``extension`` (CREATE / ALTER / DROP EXTENSION pgml),
``schema_check``; ``calls``, ``columns``, ``literals``, ``params``, ``tree`` are
their parts (values' text is ``engine.pg.text``'s). ``steps`` holds the requests and the one driver
that answers them on a session.
"""
