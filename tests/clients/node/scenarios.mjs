// node-postgres (with pg-cursor) and postgres.js scenarios for tests/test_drivers.py.
//
// Usage: node scenarios.mjs CONFIG_JSON, where CONFIG_JSON has dsn, scenarios (names to run), texts (the
// bodies of table docs, id 1, 2, ...), model, task, args, input (transform_stream) and table (for inserts).
// Every scenario uses its own connection and prints one JSON array per result: [scenario, key, value].
// A scenario that throws prints [scenario, "!error", SQLSTATE, message] and the others still run.

import pg from "pg";
import Cursor from "pg-cursor";
import postgres from "postgres";

const config = JSON.parse(process.argv[2]);
const { model, texts } = config;
const STREAM = "SELECT pgml.transform_stream($1::jsonb, $2::jsonb, $3) AS t";

function emit(...fields) {
  console.log(JSON.stringify(fields));
}

async function withPg(fn) {
  const client = new pg.Client({ connectionString: config.dsn });
  await client.connect();
  try {
    await fn(client);
  } finally {
    await client.end();
  }
}

async function withPostgresJs(fn) {
  const sql = postgres(config.dsn, { max: 1, onnotice: () => {} });
  try {
    await fn(sql);
  } finally {
    await sql.end({ timeout: 5 });
  }
}

function readAll(cursor, size) {
  return new Promise((resolve, reject) => {
    const rows = [];
    const next = () =>
      cursor.read(size, (err, batch) => {
        if (err) return reject(err);
        if (batch.length === 0) return resolve(rows);
        rows.push(...batch);
        next();
      });
    next();
  });
}

function closeCursor(cursor) {
  return new Promise((resolve) => cursor.close(() => resolve()));
}

const scenarios = {
  // ---------------------------------------------------------------- node-postgres
  "pg.embed_bound": (name) =>
    withPg(async (c) => {
      for (const text of texts) {
        const r = await c.query("SELECT pgml.embed($1, $2) AS e", [model, text]);
        emit(name, text, r.fields[0].name, r.rows[0].e);
      }
    }),
  "pg.embed_per_row": (name) =>
    withPg(async (c) => {
      const r = await c.query("SELECT id, pgml.embed($1, body) AS e FROM docs ORDER BY id", [model]);
      for (const row of r.rows) emit(name, String(row.id), row.e);
    }),
  "pg.named_prepared": (name) =>
    withPg(async (c) => {
      for (let i = 0; i < 6; i++) {
        const text = texts[i % texts.length];
        const r = await c.query({ name: "emb", text: "SELECT pgml.embed($1, $2) AS e", values: [model, text] });
        emit(name, String(i), text, r.rows[0].e);
      }
    }),
  "pg.cursor_stream": (name) =>
    withPg(async (c) => {
      const cursor = c.query(new Cursor(STREAM, [config.task, config.args, config.input]));
      for (const row of await readAll(cursor, 2)) emit(name, "row", row.t);
      await closeCursor(cursor);
      emit(name, "after", (await c.query("SELECT 1 AS one")).rows[0].one);
    }),
  "pg.cursor_per_row": (name) =>
    withPg(async (c) => {
      const cursor = c.query(new Cursor("SELECT id, pgml.embed($1, body) AS e FROM docs ORDER BY id", [model]));
      for (const row of await readAll(cursor, 2)) emit(name, String(row.id), row.e);
      await closeCursor(cursor);
    }),
  "pg.multi_values": (name) =>
    withPg(async (c) => {
      // One INSERT with two rows, each with its own pgml.embed over bound parameters.
      const r = await c.query(
        `INSERT INTO ${config.table} (id, body, emb) VALUES ($1, $2, pgml.embed($3, $2)), ($4, $5, pgml.embed($3, $5))`,
        [1, texts[0], model, 2, texts[1]],
      );
      emit(name, "inserted", r.rowCount);
      const back = await c.query(`SELECT body, emb FROM ${config.table} ORDER BY id`);
      for (const row of back.rows) emit(name, row.body, row.emb);
    }),
  "pg.error_then_rollback": (name) =>
    withPg(async (c) => {
      await c.query("BEGIN");
      try {
        await c.query("SELECT pgml.embed($1, $2)", ["no-such-model", "x"]);
        emit(name, "no error");
      } catch (err) {
        emit(name, "sqlstate", err.code);
      }
      await c.query("ROLLBACK");
      const r = await c.query("SELECT pgml.embed($1, $2) AS e", [model, texts[0]]);
      emit(name, "after", r.rows[0].e);
    }),
  "pg.plain": (name) =>
    withPg(async (c) => {
      const dump = (label, r) => {
        emit(name, label, "fields", r.fields.map((f) => [f.name, f.dataTypeID]));
        for (const row of r.rows) emit(name, label, "row", row);
      };
      dump("select", await c.query("SELECT id, body, length(body) AS n FROM docs ORDER BY id"));
      dump(
        "bound",
        await c.query("SELECT $1::int + 1 AS i, $2 || 'x' AS s, $3::numeric * 2 AS n, $4::jsonb -> 'k' AS j", [
          41,
          "s",
          "1.25",
          JSON.stringify({ k: [1, "two"] }),
        ]),
      );
      for (let i = 0; i < 3; i++) {
        dump(`named ${i}`, await c.query({ name: "plain", text: "SELECT $1::int * 2 AS d", values: [i] }));
      }
      const cursor = c.query(new Cursor("SELECT g FROM generate_series(1, 7) g"));
      emit(name, "cursor", (await readAll(cursor, 3)).map((row) => row.g));
      await closeCursor(cursor);
      await c.query("BEGIN");
      try {
        await c.query("SELECT 1/0");
      } catch (err) {
        emit(name, "error", err.code, err.message);
      }
      await c.query("ROLLBACK");
      dump("after", await c.query("SELECT count(*) AS n FROM docs"));
    }),

  // ---------------------------------------------------------------- postgres.js
  "pjs.embed_bound": (name) =>
    withPostgresJs(async (sql) => {
      for (const text of texts) {
        const rows = await sql`SELECT pgml.embed(${model}, ${text}) AS e`;
        emit(name, text, rows.columns[0].name, rows[0].e);
      }
    }),
  "pjs.embed_per_row": (name) =>
    withPostgresJs(async (sql) => {
      for (const row of await sql`SELECT id, pgml.embed(${model}, body) AS e FROM docs ORDER BY id`) {
        emit(name, String(row.id), row.e);
      }
    }),
  "pjs.cursor_stream": (name) =>
    withPostgresJs(async (sql) => {
      const task = JSON.parse(config.task);
      const args = JSON.parse(config.args);
      const query = sql`SELECT pgml.transform_stream(${sql.json(task)}::jsonb, ${sql.json(args)}::jsonb, ${config.input}) AS t`;
      await query.cursor(2, (rows) => {
        for (const row of rows) emit(name, "row", row.t);
      });
      emit(name, "after", (await sql`SELECT 1 AS one`)[0].one);
    }),
  "pjs.error_then_rollback": (name) =>
    withPostgresJs(async (sql) => {
      try {
        await sql.begin(async (tx) => {
          await tx`SELECT pgml.embed(${"no-such-model"}, ${"x"})`;
        });
        emit(name, "no error");
      } catch (err) {
        emit(name, "sqlstate", err.code);
      }
      const rows = await sql`SELECT pgml.embed(${model}, ${texts[0]}) AS e`;
      emit(name, "after", rows[0].e);
    }),
  "pjs.plain": (name) =>
    withPostgresJs(async (sql) => {
      const dump = (label, rows) => {
        emit(name, label, "columns", rows.columns.map((c) => [c.name, c.type]));
        for (const row of rows) emit(name, label, "row", row);
      };
      dump("select", await sql`SELECT id, body, length(body) AS n FROM docs ORDER BY id`);
      for (let i = 0; i < 3; i++) {
        dump(`bound ${i}`, await sql`SELECT ${i}::int + 1 AS i, ${"s" + i} || 'x' AS s, ${[1.5, i]}::float8[] AS a`);
      }
      await sql`SELECT g FROM generate_series(1, 7) g`.cursor(3, (rows) => {
        emit(name, "cursor", rows.map((row) => row.g));
      });
      try {
        await sql.begin(async (tx) => {
          await tx`SELECT 1/0`;
        });
      } catch (err) {
        emit(name, "error", err.code, err.message);
      }
      dump("unsafe", await sql.unsafe("SELECT count(*) AS n FROM docs"));
    }),
};

for (const name of config.scenarios) {
  try {
    await scenarios[name](name);
  } catch (err) {
    emit(name, "!error", String(err.code), String(err.message));
  }
}
