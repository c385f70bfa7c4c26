"""The one seam between the proxy and the model engine.

Owns: the catalogue of proxy-evaluated ``pgml.*`` functions (argument names,
SQL types, defaults, result shape), the engine's own configuration
(:class:`EngineConfig`, the ``[engine]`` section), the request and result types
(:class:`Call`, :class:`Statement`, :class:`Result`), the :class:`Engine` and
:class:`Database` protocols, what an engine reports for the proxy's metrics (:class:`EngineStats`, the
:class:`Observer` it calls), and the errors carrying a SQLSTATE (engine failures
and the value-format errors of :mod:`engine.pg`).

Must not: import any other engine module (everything else depends on this one), build
an engine (the composition root, ``proxy.cli``, does), or import an ML library (the
relay path imports this module and must stay light). The proxy imports this module
and :mod:`engine.pg`'s value formats; only its composition root (``proxy.cli``) imports
more (the executor it builds, the artifact key file's functions).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, overload

# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class EngineConfig:
    """The ``[engine]`` section of ``config.toml`` (loaded and validated by ``proxy.config``)."""

    model_dirs: tuple[str, ...] = ()
    allow_downloads: bool = False
    device: str = "auto"
    workers: int = 1
    # Calls waiting for a worker beyond this many get 53000 instead of queueing without bound.
    max_queue: int = 64
    # Seconds one batched engine call may take before the statement fails with 57014.
    call_timeout: float = 600.0
    # Texts per forward pass of an embedding model.
    batch_size: int = 32
    # What runs pgml.embed's sentence-transformers models: "torch", or "onnx" (ONNX Runtime on the CPU, the
    # model exported once into onnx_cache_dir; needs the ``onnx`` extra).
    embed_backend: str = "torch"
    # Where ONNX exports are written and reused. Empty: $XDG_CACHE_HOME/pgml-proxy/onnx (~/.cache/...).
    onnx_cache_dir: str = ""
    # Loaded models kept in memory (all connections share them), least recently used evicted first.
    cache_bytes: int = 8 * 1024**3
    trust_remote_code: bool = False
    # Models pgml.transform / transform_stream may load (empty: any); PostgresML's pgml.huggingface_whitelist.
    allowed_models: tuple[str, ...] = ()
    # The only directories pgml.load_dataset may read local files from (empty: none).
    data_dirs: tuple[str, ...] = ()
    # Secret key that signs model artifacts (HMAC-SHA256). Empty: the default location, resolved at
    # start-up (next to the embedded data directory, else the user's config directory), created with 0600.
    artifact_key_file: str = ""
    # Where model work runs: "local" (this process) or "ray" (actors and tasks of a Ray cluster, ``[ray]``).
    backend: str = "local"


@dataclass(frozen=True)
class RayConfig:
    """The ``[ray]`` section: the Ray cluster of ``[engine] backend = "ray"`` (``engine.runtime.ray_backend``)."""

    # A running cluster ("127.0.0.1:6379", "ray://host:10001"); empty: a local Ray instance started by the proxy.
    address: str = ""
    # The namespace of the model actors: every proxy of one namespace shares them.
    namespace: str = "pgml-proxy"
    # Resources of each model actor and training task.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Actors per model: calls go round-robin over them.
    replicas: int = 1


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


class EngineError(Exception):
    """An error a client should see, with its SQLSTATE (same shape as the proxy's errors)."""

    sqlstate: ClassVar[str] = "38000"  # external_routine_exception: the ML library failed

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        self.position: int | None = None


class DatabaseError(Exception):
    """Raised by a :class:`Database` when the server rejects a statement; handlers let it through untouched."""


class InvalidArgument(EngineError):
    sqlstate = "22023"  # invalid_parameter_value


class UnknownModel(EngineError):
    sqlstate = "42704"  # undefined_object


class NotSupported(EngineError):
    sqlstate = "0A000"  # feature_not_supported


class Canceled(EngineError):
    sqlstate = "57014"  # query_canceled


CANCELED = "canceling statement due to user request"  # the server's own message for a canceled statement


class WorkerLost(EngineError):
    sqlstate = "58000"  # system_error: the Ray worker process of a model actor or task died during the call


class Overloaded(EngineError):
    sqlstate = "53000"  # insufficient_resources: the work queue is full


class UntrustedArtifact(EngineError):
    sqlstate = "58000"  # system_error: a stored model artifact without a valid signature, or an unusable key


class PermissionDenied(EngineError):
    sqlstate = "42501"  # insufficient_privilege: another role's project, a file outside the allowed directories


# Value-format errors (engine.pg): the server's own SQLSTATE for text or bytes that do not fit their type.


class InvalidTextRepresentation(EngineError):
    sqlstate = "22P02"  # a value that does not parse as its type (bad JSON, malformed array)


class InvalidBinaryRepresentation(EngineError):
    sqlstate = "22P03"  # binary data that does not fit its type


class CharacterNotInRepertoire(EngineError):
    sqlstate = "22021"  # text that is not valid UTF-8 (or holds a NUL byte), as the server's encoding check says


class UntranslatableCharacter(EngineError):
    sqlstate = "22P05"  # a JSON \u0000 escape: jsonb cannot hold it


class NumericValueOutOfRange(EngineError):
    sqlstate = "22003"  # a number outside its type's range


class DatatypeMismatch(EngineError):
    sqlstate = "42804"  # e.g. a binary array whose element type is not the array's


class ProgramLimitExceeded(EngineError):
    sqlstate = "54000"  # a value beyond the documented size limits (engine.pg.scalars MAX_*)


class DataException(EngineError):
    sqlstate = "22000"  # a value the type rejects (pgvector: a vector of the wrong dimension count)


class StatementTooComplex(EngineError):
    sqlstate = "54001"  # nesting deeper than evaluated (JSON depth), like the server's stack limit


# --------------------------------------------------------------------------- #
# Catalogue
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Param:
    """One SQL argument: name, SQL type, and the default when optional (as a Python value)."""

    name: str
    type: str
    default: Any = None
    optional: bool = False


@dataclass(frozen=True)
class Signature:
    """One overload of a proxy-evaluated function.

    ``returns`` is the SQL type of a scalar result, or of each row of a set;
    ``columns`` names the output columns of a set-returning function.
    """

    function: str
    params: tuple[Param, ...]
    returns: str
    columns: tuple[tuple[str, str], ...] = ()
    # False: the result depends on database state (deployments) or has effects; never cache a rewrite.
    cacheable: bool = True
    # True: runs once per call, in statement order, with effects through the client's session (train, deploy…).
    procedure: bool = False

    @property
    def returns_set(self) -> bool:
        return bool(self.columns)


JSONB_EMPTY: dict[str, Any] = {}


def _p(name: str, type_: str, *default: Any) -> Param:
    return Param(name, type_, default[0] if default else None, bool(default))


def _train_args(y_type: str) -> tuple[Param, ...]:
    return (
        _p("task", "text", None),
        _p("relation_name", "text", None),
        _p("y_column_name", y_type, None),
        _p("algorithm", "pgml.algorithm", "linear"),
        _p("hyperparams", "jsonb", {}),
        _p("search", "pgml.search", None),
        _p("search_params", "jsonb", {}),
        _p("search_args", "jsonb", {}),
        _p("test_size", "real", 0.25),
        _p("test_sampling", "pgml.sampling", "stratified"),
        _p("runtime", "pgml.runtime", None),
        _p("automatic_deploy", "boolean", True),
        _p("materialize_snapshot", "boolean", False),
        _p("preprocess", "jsonb", {}),
    )


TRAIN_COLUMNS = (("project", "text"), ("task", "text"), ("algorithm", "text"), ("deployed", "boolean"))
DEPLOY_COLUMNS = (("project", "text"), ("strategy", "text"), ("algorithm", "text"))
PREDICT_BATCH = (("predict_batch", "real"),)
CONFIG = _p("config", "jsonb", {})
ARGS = _p("args", "jsonb", {})
CACHE = _p("cache", "boolean", False)  # accepted, as PostgresML does; pipelines are always cached here

ENVIRONMENT = (
    ("python_version", "text"),
    ("validate_python_dependencies", "boolean"),
    ("validate_shared_library", "void"),
    ("xgboost_version", "text"),
)
TRUTH, Y_HAT = _p("ground_truth", "real[]"), _p("y_hat", "real[]")
METRIC_FUNCTIONS = (
    ("sklearn_f1_score", "real"),
    ("sklearn_r2_score", "real"),
    ("sklearn_regression_metrics", "jsonb"),
)

CATALOGUE: tuple[Signature, ...] = (
    Signature("version", (), "text"),
    Signature("embed", (_p("transformer", "text"), _p("text", "text"), _p("kwargs", "jsonb", JSONB_EMPTY)), "real[]"),
    Signature(
        "embed",
        (_p("transformer", "text"), _p("inputs", "text[]"), _p("kwargs", "jsonb", JSONB_EMPTY)),
        "real[]",
        columns=(("embed", "real[]"),),
    ),
    Signature(
        "chunk",
        (_p("splitter", "text"), _p("text", "text"), _p("kwargs", "jsonb", JSONB_EMPTY)),
        "record",
        columns=(("chunk_index", "bigint"), ("chunk", "text")),
    ),
    *(
        # Not cacheable: generation may sample, and a model may name a tuned project whose deployment changes.
        Signature("transform", (_p("task", task), ARGS, _p("inputs", inputs, []), CACHE), "jsonb", (), False)
        for inputs in ("text[]", "jsonb[]")
        for task in ("jsonb", "text")
    ),
    *(
        Signature(
            "transform_stream",
            (_p("task", task), _p("args", "jsonb", {}), _p(name, inputs, default), CACHE),
            "jsonb",
            (("transform_stream", "jsonb"),),
            cacheable=False,
        )
        for name, inputs, default in (("input", "text", ""), ("inputs", "jsonb[]", []))
        for task in ("jsonb", "text")
    ),
    Signature(
        "rank",
        (_p("transformer", "text"), _p("query", "text"), _p("documents", "text[]"), _p("kwargs", "jsonb", {})),
        "record",
        (("corpus_id", "bigint"), ("score", "double precision"), ("text", "text")),
    ),
    *(
        Signature(name, (_p("project_name", "text"), *rest), "record", TRAIN_COLUMNS, cacheable=False, procedure=True)
        for name, rest in (("train", _train_args("text")), ("train_joint", _train_args("text[]")))
    ),
    Signature(
        "load_dataset",
        (_p("source", "text"), _p("subset", "text", None), _p("limit", "bigint", None), _p("kwargs", "jsonb", {})),
        "record",
        (("table_name", "text"), ("rows", "bigint")),
        cacheable=False,
        procedure=True,
    ),
    Signature(
        "tune",
        (
            _p("project_name", "text"),
            _p("task", "text", None),
            _p("relation_name", "text", None),
            _p("y_column_name", "text", None),
            _p("model_name", "text", None),
            _p("hyperparams", "jsonb", {}),
            _p("test_size", "real", 0.25),
            _p("test_sampling", "pgml.sampling", "stratified"),
            _p("automatic_deploy", "boolean", True),
            _p("materialize_snapshot", "boolean", False),
        ),
        "record",
        (("status", "text"), ("task", "text"), ("algorithm", "text"), ("deployed", "boolean")),
        cacheable=False,
        procedure=True,
    ),
    *(
        Signature("generate", (_p("project_name", "text"), _p("inputs", t), CONFIG), t, cacheable=False)
        for t in ("text", "text[]")
    ),
    Signature(
        "snapshot",
        (
            _p("relation_name", "text"),
            _p("y_column_name", "text"),
            _p("test_size", "real", 0.25),
            _p("test_sampling", "pgml.sampling", "stratified"),
            _p("preprocess", "jsonb", {}),
        ),
        "record",
        (("relation", "text"), ("y_column_name", "text")),
        cacheable=False,
        procedure=True,
    ),
    Signature("deploy", (_p("model_id", "bigint"),), "record", DEPLOY_COLUMNS, cacheable=False, procedure=True),
    Signature(
        "deploy",
        (_p("project_name", "text"), _p("strategy", "pgml.strategy"), _p("algorithm", "pgml.algorithm", None)),
        "record",
        DEPLOY_COLUMNS,
        cacheable=False,
        procedure=True,
    ),
    # predict(project, text) on a project tuned for text classification: the label (jsonb: the training label's
    # own JSON type) or, predict_proba, the class probabilities in label order. Before the array overloads: an
    # unknown literal ('I love SQL', also '{1,2}') goes to text, as PostgreSQL resolves it (string category first).
    *(
        Signature(name, (_p("project_name", "text"), _p("inputs", "text")), "jsonb", cacheable=False)
        for name in ("predict", "predict_proba")
    ),
    *(
        Signature("predict", (_p(key, key_type), _p("features", f"{element}[]")), "real", cacheable=False)
        for key, key_type in (("project_name", "text"), ("model_id", "bigint"))
        for element in ("real", "double precision", "smallint", "integer", "bigint", "boolean")
    ),
    *(
        Signature(name, (_p(key, key_type), _p("features", "real[]")), "real[]", cacheable=False)
        for name in ("predict_proba", "predict_joint")
        for key, key_type in (("project_name", "text"), ("model_id", "bigint"))
    ),
    # After the number arrays: constant folding reads ARRAY[1, 2] as text[] too, PostgreSQL types it integer[].
    *(
        Signature(name, (_p("project_name", "text"), _p("inputs", "text[]")), "jsonb", cacheable=False)
        for name in ("predict", "predict_proba")
    ),
    *(
        Signature("predict_batch", (_p(key, key_type), _p("features", "real[]")), "real", PREDICT_BATCH, False)
        for key, key_type in (("project_name", "text"), ("model_id", "bigint"))
    ),
    *(
        Signature("predict", (_p(key, key_type), _p("row", "record")), "real", cacheable=False)
        for key, key_type in (("project_name", "text"), ("model_id", "bigint"))
    ),
    Signature("decompose", (_p("project_name", "text"), _p("vector", "real[]")), "real[]", cacheable=False),
    # The engine's environment, as PostgresML's environment functions report theirs.
    *(Signature(name, (), returns) for name, returns in ENVIRONMENT),
    Signature("python_package_version", (_p("name", "text"),), "text"),
    Signature("python_pip_freeze", (), "text", (("package", "text"),)),
    Signature("clear_gpu_cache", (_p("memory_usage", "real", None),), "boolean", cacheable=False),
    # PostgresML's scikit-learn metric functions.
    *(Signature(name, (TRUTH, Y_HAT), returns) for name, returns in METRIC_FUNCTIONS),
    Signature("sklearn_classification_metrics", (TRUTH, Y_HAT, _p("num_classes", "bigint")), "jsonb"),
    # The registry as CSV files, one per table, in a directory under [engine] data_dirs.
    *(
        Signature(name, (_p("path", "text"),), "void", cacheable=False, procedure=True)
        for name in ("dump_all", "load_all")
    ),
)


def signatures(function: str) -> list[Signature]:
    """Overloads of ``pgml.<function>`` that the engine evaluates (empty: not ours)."""
    return [s for s in CATALOGUE if s.function == function]


def evaluated_functions() -> frozenset[str]:
    return frozenset(s.function for s in CATALOGUE)


# --------------------------------------------------------------------------- #
# Requests and the engine
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Columns(Sequence[tuple[Any, ...]]):
    """A batch's argument tuples held by column (a :class:`Call`'s ``rows``): argument ``j`` of every row is
    ``columns[j]`` itself where ``shared[j]``, else that row's entry of ``columns[j]`` (a sequence, or a numpy
    array whose first axis is the rows). It reads as the sequence of tuples; a handler may take a column whole
    (the predict family: one feature matrix for all the rows)."""

    length: int
    columns: tuple[Any, ...]
    shared: tuple[bool, ...]

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> tuple[Any, ...]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[Any, ...]]: ...
    def __getitem__(self, index: int | slice) -> tuple[Any, ...] | Sequence[tuple[Any, ...]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.length))]
        if not -self.length <= index < self.length:
            raise IndexError(index)
        return tuple(c if one else c[index] for c, one in zip(self.columns, self.shared, strict=True))


@dataclass(frozen=True)
class SessionSettings:
    """PostgresML's settings as the caller's session has them (read by ``proxy.rewrite.pgml_settings``); they
    only ever narrow ``[engine]``: ``pgml.huggingface_whitelist`` (empty: no narrowing),
    ``pgml.huggingface_trust_remote_code`` (off, its default, refuses code shipped with models),
    ``pgml.huggingface_trust_remote_code_whitelist`` (empty: any model [engine] trusts) and
    ``pgml.omp_num_threads`` (None: unset; else at most this many compute threads)."""

    whitelist: tuple[str, ...] = ()
    trust_remote_code: bool = False
    trust_remote_code_whitelist: tuple[str, ...] = ()
    omp_num_threads: int | None = None


@dataclass(frozen=True)
class Call:
    """One batch of evaluations of one overload: each entry of ``rows`` is a full argument tuple.

    Results come back in the order of ``rows``; a set-returning overload gives
    a list of output rows per entry.
    """

    signature: Signature
    rows: Sequence[tuple[Any, ...]]
    session: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    db: Database | None = None  # the client's session, for functions that read or write tables
    inform: Callable[[str, str], None] | None = None  # (severity, message) to the client now, from any thread
    database: str = ""  # its database name (keys of per-database caches)
    notices: list[str] = field(default_factory=list)  # WARNINGs for the client (e.g. a model not deployed)
    settings: SessionSettings | None = None  # the session's pgml.* settings (None: not read, nothing narrowed)


@dataclass(frozen=True)
class Statement:
    """One SQL statement the engine or the proxy runs on a client's own upstream session.

    ``params`` bind ``$1, $2, …``: ``str`` in text format, ``bytes`` in binary
    format (``bytea``), ``None`` for NULL. ``copy_data`` feeds ``COPY … FROM STDIN``.
    """

    sql: str
    params: tuple[str | bytes | None, ...] = ()
    copy_data: bytes | None = None
    visible: bool = False  # its answer (rows, command tag, notices, error) goes to the client as is


@dataclass
class Result:
    """One statement's answer: columns (name, type OID), rows in text format, the command tag, COPY TO data."""

    columns: list[tuple[str, int]] = field(default_factory=list)
    rows: list[tuple[str | None, ...]] = field(default_factory=list)
    command: str = ""
    copy: bytes = b""
    copy_rows: list[int] = field(default_factory=list)  # each CopyData message's length: PostgreSQL sends one per row


class Database(Protocol):
    """The client's own upstream session: its privileges, its transaction, its temp tables."""

    @property
    def in_transaction(self) -> bool:
        """True inside BEGIN or an extended-protocol batch: statements run are not committed on their own."""
        ...

    async def execute(self, statements: Sequence[Statement]) -> list[Result]:
        """Run ``statements`` in order, as one unit; raises on the first error (the server's own)."""
        ...


class Engine(Protocol):
    """Evaluates batches of ``pgml.*`` calls off the event loop."""

    async def evaluate(self, call: Call) -> list[Any]:
        """Results in the order of ``call.rows``; raises EngineError for user errors."""
        ...

    def stream(self, call: Call) -> AsyncIterator[list[str]]:
        """``pgml.transform_stream``: text fragments (one string per sequence) as they are generated.

        Generation runs in a worker; closing the iterator (or a cancel of the session) stops it.
        """
        ...

    def cancel(self, session: int) -> None:
        """Stop the work of ``session`` (CancelRequest, disconnect); its pending calls raise Canceled."""
        ...

    async def close(self) -> None:
        """Stop workers and free models."""
        ...

    def stats(self) -> EngineStats:
        """What the engine holds now (read at each metrics scrape, on the event loop: cheap, never blocking)."""
        ...


# --------------------------------------------------------------------------- #
# What an engine reports (the proxy's metrics endpoint reads and receives it)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's state, taken at a metrics scrape."""

    admitted: int  # calls admitted (running or waiting for a compute turn), at most [engine] max_queue
    waiting: int  # of those, calls waiting for a compute turn: the engine's queue
    cache_bytes: int  # bytes of the models loaded in the shared cache
    cached_models: int
    # Ray actors (model replicas) this engine uses; None for an engine without any (the local one).
    ray_actors: int | None = None


class Observer(Protocol):
    """Told by an engine of what it did (the proxy's metrics histograms); called from worker threads,
    so it must be thread-safe and never block."""

    def waited(self, seconds: float) -> None:
        """A call waited this long for a compute turn (0 when one was free)."""

    def loaded(self, seconds: float) -> None:
        """A model took this long to load into the cache."""
