"""Definitions: the parts of a statement the server stores, to evaluate later, never when it is run.

Owns: :func:`stored` — whether a node of a parsed statement is a definition the server keeps as
written (by the OIDs it resolves) and evaluates afterwards, each time it is used: a view's or a
materialized view's query (REFRESH runs it again on the server), a function's or procedure's
parameter defaults and body (``RETURN …``, ``BEGIN ATOMIC``; a quoted body is a string anyway),
a trigger (its WHEN), a rule, a policy's USING and WITH CHECK (CREATE and ALTER POLICY), every
constraint (a column's DEFAULT and GENERATED expression, CHECK, in CREATE TABLE, ALTER TABLE … ADD
COLUMN / ADD CONSTRAINT and domains), ALTER TABLE … ALTER COLUMN SET DEFAULT / SET EXPRESSION, an
index's expressions and predicate, extended statistics' expressions, a partition key, a
publication's row filter, CREATE / ALTER DOMAIN. The call finder (:mod:`proxy.rewrite.calls`)
does not look inside them, so a ``pgml.*`` call there goes to the server untouched: it runs where
the server evaluates the definition (the server-side functions: callback mode).

Not definitions, so still the proxy's to evaluate: everything a statement runs now — CREATE TABLE
AS / SELECT INTO, ALTER COLUMN TYPE … USING (rewrites the rows now), partition bounds (evaluated
once, at CREATE), a PREPARE's statement (run at each EXECUTE, where :mod:`proxy.rewrite.sql_prepare`
substitutes it; :func:`proxy.rewrite.analyze.of` leaves the PREPARE itself alone).

Must not: walk, change or evaluate anything: it looks at one node.
"""

from __future__ import annotations

from typing import Any

from pglast import ast, enums

# Nodes whose whole subtree is stored.
_STORED = (
    ast.ViewStmt,
    ast.CreateFunctionStmt,
    ast.CreateTrigStmt,
    ast.RuleStmt,
    ast.CreatePolicyStmt,
    ast.AlterPolicyStmt,
    ast.Constraint,
    ast.IndexStmt,
    ast.CreateStatsStmt,
    ast.PartitionSpec,
    ast.PublicationTable,
    ast.CreateDomainStmt,
    ast.AlterDomainStmt,
)
# ALTER TABLE subcommands whose expression is stored (ADD COLUMN's and ADD CONSTRAINT's are Constraint nodes).
_STORED_COMMANDS = frozenset({enums.AlterTableType.AT_ColumnDefault, enums.AlterTableType.AT_SetExpression})


def stored(node: Any) -> bool:
    """``node`` is a definition the server stores (its calls are the server's to run, when it uses it)."""
    match node:
        case ast.CreateTableAsStmt(objtype=enums.ObjectType.OBJECT_MATVIEW):
            return True
        case ast.AlterTableCmd(subtype=subtype):
            return subtype in _STORED_COMMANDS
    return isinstance(node, _STORED)
