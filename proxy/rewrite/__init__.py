"""Rewriting statements that call ``pgml.*``: the decision per statement, analysis, evaluation of constant
and per-row calls, bound parameters, literals, call finding. No socket I/O."""
