"""The order in which the calls of one analysed statement string are evaluated and replaced.

Owns: statement by statement, and within one statement inside-out in rounds (a call waits while
its arguments, or the rows its arguments read, still hold another pgml call); within a round,
procedures one at a time in statement order, then one engine batch per overload of the calls with
constant arguments (:mod:`proxy.rewrite.constant`), then the per-row calls
(:mod:`proxy.rewrite.per_row`), unless every per-row call left stands in the statement's output: then
the statement streams (:mod:`proxy.rewrite.streaming`); and running the string's earlier statements visibly on the
session first when a later one needs the server (a call reading the database must see them).

Must not: run anything itself — it yields :mod:`proxy.rewrite.steps` requests — or paste text
into SQL: replacements are AST nodes, put in place by identity.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pglast import ast

from engine.api import Signature
from proxy.errors import FeatureNotSupported
from proxy.rewrite import constant, gather, outputs, per_row
from proxy.rewrite.analyze import Analysis
from proxy.rewrite.calls import DEFAULT, Site, bind
from proxy.rewrite.columns import keep_column_names
from proxy.rewrite.literals import is_constant
from proxy.rewrite.steps import Evaluate, Run, Steps
from proxy.rewrite.tree import deparse, deparse_all, nodes_under, replace_nodes
from proxy.session.exchange import Statement

# Runs a statement whose per-row calls all stand in its output (a Plan), computing them on its rows: True when it
# did (False: it cannot; nothing ran). The flag: the statement is the string's last.
StreamRunner = Callable[[outputs.Plan, bool], Steps[bool]]


def rewrite(analysis: Analysis, *, dependent_ok: bool, stream: StreamRunner | None = None) -> Steps[str | None]:
    """Evaluate every call and return the rewritten SQL (the analysis' tree is changed in place).

    Calls are evaluated inside-out, in rounds: a call waits while its arguments, or the rows its
    arguments are read from (a WHERE, a CTE, a derived table), still contain another pgml call; so
    no query the proxy sends contains one. The statements of a string are taken in order.

    ``stream``: a statement whose remaining calls all stand in its output (:mod:`proxy.rewrite.outputs`) is
    given to it, to be computed on its rows as they arrive (:mod:`proxy.rewrite.streaming`: a Query's rows
    go to the client now; a Bind's portal is opened for the client's Executes).

    None: the statements were run here already (a call after the first statement of a query string
    needed the server: the statements before it ran first, with their answers going to the client);
    the client has every answer but the final ReadyForQuery.
    """
    stmts = analysis.stmts
    for raw, sites in zip(stmts, analysis.sites, strict=True):
        keep_column_names(raw.stmt, sites)
        top = raw.stmt.targetList if isinstance(raw.stmt, ast.SelectStmt) else None
        columns = {id(t.val) for t in top or ()}
        for site in sites:
            site.output = id(site.call) in columns
    visible = _Visible(stmts)
    for index, (raw, sites) in enumerate(zip(stmts, analysis.sites, strict=True)):
        pending = list(sites)
        streamed = False
        while pending:
            ready = [site for site in pending if not _waits(site, pending)]
            if not ready:
                raise FeatureNotSupported("pgml calls whose arguments depend on each other's results")
            if stream is not None:  # constant calls first, on their own: what is left may then stream
                constants = [site for site in ready if constant.folded(site) is not None]
                if not constants and (plan := outputs.plan(raw.stmt, pending)) is not None:
                    yield from visible.before(index)  # the statements before it ran first, as for any server read
                    streamed = yield from stream(plan, index == len(stmts) - 1)
                    if streamed:
                        break
                ready = constants or ready
            replacements = yield from _round(ready, dependent_ok, functools.partial(visible.before, index))
            raw.stmt = replace_nodes(raw.stmt, replacements)
            pending = [site for site in pending if site not in ready]
        if streamed:  # it ran, its rows went to the client: the statements after it run here too
            visible.ran = index + 1
        elif visible.ran:
            yield from visible.run((raw,), finish=index == len(stmts) - 1)
            visible.ran = index + 1
    return None if visible.ran else deparse_all(stmts)


@dataclass
class _Visible:
    """The string's statements the proxy ran on the session with their answers going to the client."""

    stmts: tuple[ast.RawStmt, ...]
    ran: int = 0  # how many of them (0: none; once one needed the server, all run here)

    def before(self, index: int) -> Steps[None]:
        """Run the statements before statement ``index``, once: a query for its call must see what they did."""
        if self.ran == 0 and index > 0:
            yield from self.run(self.stmts[:index], finish=False)
            self.ran = index

    def run(self, stmts: tuple[ast.RawStmt, ...], *, finish: bool) -> Steps[None]:
        """The client's own statements (rewritten already), with their answers going to the client."""
        if any(isinstance(raw.stmt, ast.CopyStmt) for raw in stmts):
            raise FeatureNotSupported(
                "COPY in a query string with a per-row pgml call after its first statement",
                hint="Send the COPY on its own.",
            )
        texts = [deparse(raw) for raw in stmts if raw.stmt is not None]
        yield Run(tuple(Statement(sql, visible=True) for sql in texts), keep_open=not finish, finish=finish)


def _waits(site: Site, pending: list[Site]) -> bool:
    """Whether ``site`` must wait for another pending call: one inside its arguments or the rows they read."""
    others = {id(other.call) for other in pending if other is not site}
    if not others:
        return False
    regions: list[Any] = list(site.call.args or ())
    if constant.folded(site) is None:
        _, slots = bind(site)
        regions.extend(gather.reads(site, [s for s in slots if s is not DEFAULT and not is_constant(s)]))
    return any(isinstance(node, ast.FuncCall) and id(node) in others for node in nodes_under(regions))


def _round(
    ready: list[Site], dependent_ok: bool, before_query: Callable[[], Steps[None]]
) -> Steps[dict[int, ast.Node]]:
    """One round: procedures one by one in statement order, constants one batch per overload, then the rest."""
    replacements: dict[int, ast.Node] = {}
    constant_calls: dict[int, list[tuple[Site, tuple[Any, ...]]]] = defaultdict(list)  # by id(signature)
    signature_of: dict[int, Signature] = {}
    dependent: list[tuple[Site, list[Signature], list[Any]]] = []
    for site in ready:
        folded = constant.folded(site)
        if folded is not None:
            constant_calls[id(folded[0])].append((site, folded[1]))
            signature_of[id(folded[0])] = folded[0]
            continue
        if not dependent_ok:
            raise FeatureNotSupported(
                f"pgml.{site.function}() with column or parameter arguments is not supported in the extended"
                " query protocol yet",
                hint="Pass constant arguments, or use the simple query protocol for per-row calls.",
            )
        dependent.append((site, *bind(site)))
    # Procedures (train, deploy, load_dataset…) first, one call at a time in statement order:
    # what they change (a deployment, a table) is what the other calls of the statement see.
    if any(not signature_of[k].cacheable for k in constant_calls):
        yield from before_query()  # they read the database (a model, a table): after the string's earlier statements
    procedures = [
        (signature_of[k], e) for k, entries in constant_calls.items() for e in entries if signature_of[k].procedure
    ]
    for sig, (site, values) in sorted(procedures, key=lambda p: p[1][0].call.location or 0):
        (result,) = yield Evaluate(sig, (values,))
        replacements.update(constant.replacement(site, sig, result))
    for key, entries in constant_calls.items():
        sig = signature_of[key]
        if sig.procedure:
            continue
        results = yield Evaluate(sig, tuple(values for _, values in entries))
        for (site, _), result in zip(entries, results, strict=True):
            replacements.update(constant.replacement(site, sig, result))
    for site, candidates, slots in dependent:
        yield from before_query()
        replacements.update((yield from per_row.replacement(site, candidates, slots)))
    return replacements
