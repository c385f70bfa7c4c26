"""The callback guard without sockets: which startup packets make a callback session, and what one may run."""

from __future__ import annotations

import pytest

from proxy.rewrite.callback_guard import accepted, is_callback
from proxy.session.startup import settings
from proxy.wire.frames import StartupMessage

# What a stub sends ahead of its call (sql/010_callback_settings.sql): the caller's four settings.
SETTINGS = (
    "SET pgml.huggingface_whitelist TO ''; SET pgml.huggingface_trust_remote_code TO 'on';"
    " SET pgml.huggingface_trust_remote_code_whitelist TO 'a,b'; SET pgml.omp_num_threads TO '2'"
)
VERSION = "; SELECT pgml.version()"


def startup(**params: str) -> StartupMessage:
    return StartupMessage(3, 0, tuple(params.items()))


@pytest.mark.parametrize(
    ("params", "callback"),
    [
        ({"user": "a"}, False),
        ({"options": "-c pgml_proxy.callback=on"}, True),
        ({"options": "-cpgml_proxy.callback=on"}, True),
        ({"options": "--pgml_proxy.callback=on"}, True),
        ({"options": "--pgml-proxy.callback=true"}, True),
        ({"options": "-Ec PGML_PROXY.CALLBACK=on"}, True),
        ({"options": r"-c search_path=a,\ b -c pgml\_proxy.callback=on"}, True),
        ({"pgml_proxy.callback": "on"}, True),
        ({"options": "-c pgml_proxy.callback=off"}, False),
        ({"options": "-c pgml_proxy.callback=on", "pgml_proxy.callback": "off"}, False),  # parameters come last
        ({"options": "-c statement_timeout=5 -- -c pgml_proxy.callback=on"}, False),  # after --: not a switch
    ],
)
def test_a_callback_session_is_known_by_its_startup_packet(params: dict[str, str], callback: bool) -> None:
    assert is_callback(startup(**params)) is callback


def test_settings_as_the_server_applies_them() -> None:
    found = settings(startup(user="u", options=r"-c a.b=1\ 2 --c-d.e=x -B 8", **{"a.b": "3", "_pq_.x": "y"}))
    assert found == {"a.b": "3", "c_d.e": "x"}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pgml.embed('m'::text, 'x'::text)",
        "SELECT * FROM pgml.train('p'::text, NULL::text, '{1,2}'::real[])",
        "SELECT pgml.version()",
        "SELECT pgml.embed(transformer => 'm', text => 'x'::varchar(3))",
        "SELECT pgml.predict('p', ARRAY[1, -2.5]::real[])",
        "SELECT pgml.predict('p'::text, '{1,2}'::double precision[])",
        "SELECT * FROM pgml.train('p'::text, 'regression'::text, 't'::text, 'y'::text, 'xgboost'::pgml.algorithm)",
        "SELECT pgml.embed('m'::text, 'x'::text, '{}'::jsonb)",
        "set client_encoding to 'LATIN1'",
        SETTINGS + "; SELECT pgml.embed('m'::text, 'x'::text)",
        SETTINGS + "; SELECT * FROM pgml.train('p'::text, NULL::text, '{1,2}'::real[])",
        # the names as the server compares them (case-insensitive), values as %L quotes them, any subset
        "SET \"PGML\".HuggingFace_Whitelist TO E'a\\\\b, ''c'' d'; SET SESSION pgml.omp_num_threads TO ''"
        "; SELECT pgml.transform('{}'::jsonb, '{}'::jsonb, '{x}'::text[])",
    ],
)
def test_what_the_stubs_send_is_accepted(sql: str) -> None:
    assert accepted(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "",
        "SELECT current_user",
        "CREATE TABLE x ()",
        "SELECT pgml.embed('m', 'x'); SELECT 1",
        "SELECT pgml.embed(m, body) FROM t",
        "SELECT pgml.predict('p', ARRAY[1,2]), version()",
        "SELECT pgml.embed('m', 'x') INTO t",
        "SELECT pgml.embed('m', (SELECT 'x'))",
        "SELECT pgml.embed('m', 'x') WHERE true",
        "SELECT pgml.embed('m', 'x') LIMIT 1",
        "SELECT * FROM pgml.chunk('a', 'b'), t",
        "SELECT * FROM pgml.chunk('a', 'b') WITH ORDINALITY",
        "SELECT pgml.cosine_similarity('{1}'::real[], '{1}'::real[])",
        "SELECT pgml.callback_disable()",
        "WITH d AS (DELETE FROM t) SELECT pgml.version()",
        "SELECT pgml.embed('m', 'x') FOR UPDATE",
        "SET search_path = public",
        "SET LOCAL client_encoding TO 'UTF8'",
        "SELECT pgml.embed('m', 'x') UNION SELECT pgml.embed('m', 'y')",
        # a cast to a type a role can create (a domain's CHECK, an input function would run as the callback role)
        "SELECT pgml.embed('m', 'x'::public.evil)",
        "SELECT pgml.embed('m', 'x'::evil)",
        "SELECT pgml.embed('m', ARRAY['a']::alice.d[])",
        "SELECT pgml.predict('p', '(1,2)'::public.row_type)",
        "SELECT pgml.embed('m', 'x'::vector)",
        # the registry owner's functions: through the callback server every role would be the callback role
        "SELECT pgml.load_all('/data/dump')",
        "SELECT pgml.dump_all('/data/dump')",
        "SELECT pgml.clear_gpu_cache()",
        "not sql at all",
        # the caller's settings ahead of a stub's call: exactly the statements the stubs send, nothing more
        SETTINGS,
        SETTINGS + "; SELECT current_user",
        SETTINGS + "; " + SETTINGS + VERSION,
        "SELECT pgml.version(); " + SETTINGS,
        SETTINGS + "; set client_encoding to 'LATIN1'",
        "SET role TO 'postgres'" + VERSION,
        "SET session_authorization TO 'postgres'" + VERSION,
        "SET search_path TO 'evil'" + VERSION,
        "SET SESSION AUTHORIZATION 'postgres'" + VERSION,
        "SET ROLE 'postgres'" + VERSION,
        "SET LOCAL pgml.omp_num_threads TO '1'" + VERSION,
        "SET pgml.omp_num_threads TO DEFAULT" + VERSION,
        "RESET pgml.omp_num_threads" + VERSION,
        "SET pgml.omp_num_threads TO 1" + VERSION,
        "SET pgml.omp_num_threads TO 'a', 'b'" + VERSION,
        "SET pgml.omp_num_threads FROM CURRENT" + VERSION,
        "SET pgml.omp_num_threads TO '1'; SET PGML.OMP_NUM_THREADS TO '2'" + VERSION,
        "SET pgml.omp_num_threads TO '1'; SET TIME ZONE 'UTC'" + VERSION,
        "SET pgml.omp_num_threads TO '1'; SET pgml.other TO '1'" + VERSION,
        "SELECT pg_catalog.set_config('pgml.omp_num_threads', '1', false)" + VERSION,
        "ALTER ROLE current_user SET pgml.omp_num_threads TO '1'" + VERSION,
        "SET pgml.omp_num_threads TO '1'; SELECT current_user",
        "SET pgml.omp_num_threads TO '1'; SELECT pgml.embed(m, body) FROM t",
    ],
)
def test_anything_else_is_refused(sql: str) -> None:
    assert not accepted(sql)
