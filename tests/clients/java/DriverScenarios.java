// pgjdbc scenarios for tests/test_drivers.py: compiled by the test (javac) against Debian's
// /usr/share/java/postgresql.jar and run with `java -cp`.
//
// Usage: java DriverScenarios JDBC_URL key=value... (scenarios, texts, model, task, args,
// input, model_id, project, features, table)
// Every scenario opens its own connection (so one that fails leaves the others alone) and prints one line
// per result: a JSON array of strings ["scenario", field..., value]. A scenario that throws prints
// ["scenario", "!error", SQLSTATE, message] and the program goes on with the next one.

import java.sql.Array;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;

public final class DriverScenarios {
    private final String url;
    private final Map<String, String> opts;
    private final String[] texts;  // the bodies of table docs, id 1, 2, ...

    private DriverScenarios(String url, Map<String, String> opts) {
        this.url = url;
        this.opts = opts;
        this.texts = opts.get("texts").split("\\|");
    }

    public static void main(String[] argv) throws Exception {
        Map<String, String> opts = new LinkedHashMap<>();
        for (int i = 1; i < argv.length; i++) {
            int eq = argv[i].indexOf('=');
            opts.put(argv[i].substring(0, eq), argv[i].substring(eq + 1));
        }
        DriverScenarios run = new DriverScenarios(argv[0], opts);
        for (String name : opts.get("scenarios").split(",")) {
            try {
                run.scenario(name);
            } catch (SQLException e) {
                emit(name, "!error", String.valueOf(e.getSQLState()), String.valueOf(e.getMessage()));
            }
        }
    }

    private void scenario(String name) throws SQLException {
        switch (name) {
            case "embed_bound" -> embedBound(name);
            case "embed_per_row" -> embedPerRow(name, false);
            case "embed_per_row_fetch_size" -> embedPerRow(name, true);
            case "threshold" -> threshold(name);
            case "batch" -> batch(name, opts.get("table"));
            case "stream" -> stream(name, false);
            case "stream_fetch_size" -> stream(name, true);
            case "predict_model_id" -> predictModelId(name);
            case "predict_float8_array" -> predictFloat8Array(name);
            case "error_then_rollback" -> errorThenRollback(name);
            case "plain" -> plain(name);
            default -> throw new IllegalArgumentException(name);
        }
    }

    private Connection connect(String... extra) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", "postgres");
        for (int i = 0; i < extra.length; i += 2) {
            props.setProperty(extra[i], extra[i + 1]);
        }
        return DriverManager.getConnection(url, props);
    }

    private void embedBound(String name) throws SQLException {
        try (Connection c = connect(); PreparedStatement ps = c.prepareStatement("SELECT pgml.embed(?, ?)")) {
            for (String text : texts) {
                ps.setString(1, opts.get("model"));
                ps.setString(2, text);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    emit(name, text, rs.getString(1));
                }
            }
        }
    }

    // With a fetch size (inside a transaction) pgjdbc reads the portal 2 rows at a time: Execute(2), PortalSuspended.
    private void embedPerRow(String name, boolean fetchSize) throws SQLException {
        String sql = "SELECT id, pgml.embed(?, body) FROM docs ORDER BY id";
        try (Connection c = connect()) {
            c.setAutoCommit(!fetchSize);
            try (PreparedStatement ps = c.prepareStatement(sql)) {
                if (fetchSize) {
                    ps.setFetchSize(2);
                }
                ps.setString(1, opts.get("model"));
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        emit(name, rs.getString(1), rs.getString(2));
                    }
                }
            }
            if (fetchSize) {
                c.commit();
            }
        }
    }

    // pgjdbc switches a PreparedStatement to a named server-side statement after prepareThreshold (5) runs.
    private void threshold(String name) throws SQLException {
        try (Connection c = connect();
             PreparedStatement constant = c.prepareStatement("SELECT pgml.embed(?, ?) AS e");
             PreparedStatement perRow = c.prepareStatement("SELECT body, pgml.embed(?, body) FROM docs WHERE id = ?")) {
            for (int i = 0; i < 7; i++) {
                String text = texts[i % texts.length];
                constant.setString(1, opts.get("model"));
                constant.setString(2, text);
                try (ResultSet rs = constant.executeQuery()) {
                    rs.next();
                    emit(name, "constant", String.valueOf(i), rs.getMetaData().getColumnLabel(1), text, rs.getString(1));
                }
                perRow.setString(1, opts.get("model"));
                perRow.setInt(2, i % texts.length + 1);
                try (ResultSet rs = perRow.executeQuery()) {
                    rs.next();
                    emit(name, "per_row", String.valueOf(i), rs.getString(1), rs.getString(2));
                }
            }
        }
    }

    private void batch(String name, String table) throws SQLException {
        String sql = "INSERT INTO " + table + " (id, body, emb) VALUES (?, ?, pgml.embed(?, ?))";
        try (Connection c = connect("reWriteBatchedInserts", "true")) {
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement(sql)) {
                for (int i = 0; i < texts.length; i++) {
                    ps.setInt(1, i + 1);
                    ps.setString(2, texts[i]);
                    ps.setString(3, opts.get("model"));
                    ps.setString(4, texts[i]);
                    ps.addBatch();
                }
                int total = 0;
                for (int count : ps.executeBatch()) {
                    total += count == Statement.SUCCESS_NO_INFO ? 1 : count;
                }
                emit(name, "inserted", String.valueOf(total));
            }
            c.commit();
            try (Statement st = c.createStatement();
                 ResultSet rs = st.executeQuery("SELECT body, emb FROM " + table + " ORDER BY id")) {
                while (rs.next()) {
                    emit(name, "row", rs.getString(1), rs.getString(2));
                }
            }
            c.commit();
        }
    }

    private void stream(String name, boolean fetchSize) throws SQLException {
        String sql = "SELECT pgml.transform_stream(?::jsonb, ?::jsonb, ?)";
        try (Connection c = connect()) {
            if (fetchSize) {
                c.setAutoCommit(false);  // pgjdbc fetches 2 rows at a time from a portal only inside a transaction
            }
            try (PreparedStatement ps = c.prepareStatement(sql)) {
                if (fetchSize) {
                    ps.setFetchSize(2);
                }
                ps.setString(1, opts.get("task"));
                ps.setString(2, opts.get("args"));
                ps.setString(3, opts.get("input"));
                try (ResultSet rs = ps.executeQuery()) {
                    emit(name, "column", rs.getMetaData().getColumnLabel(1));
                    while (rs.next()) {
                        emit(name, "row", rs.getString(1));
                    }
                }
            }
            if (fetchSize) {
                c.commit();
            }
            try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery("SELECT 1")) {
                rs.next();
                emit(name, "after", rs.getString(1));
            }
        }
    }

    private void predictModelId(String name) throws SQLException {
        String sql = "SELECT id, pgml.predict(?::bigint, ARRAY[a, b, c]) FROM feats ORDER BY id";
        try (Connection c = connect(); PreparedStatement ps = c.prepareStatement(sql)) {
            ps.setLong(1, Long.parseLong(opts.get("model_id")));
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    emit(name, rs.getString(1), rs.getString(2));
                }
            }
        }
    }

    private void predictFloat8Array(String name) throws SQLException {
        String sql = "SELECT pgml.predict(?, ?)";
        try (Connection c = connect(); PreparedStatement ps = c.prepareStatement(sql)) {
            String[] features = opts.get("features").split(";");
            for (String row : features) {
                String[] parts = row.split(",");
                Double[] values = new Double[parts.length];
                for (int i = 0; i < parts.length; i++) {
                    values[i] = Double.valueOf(parts[i]);
                }
                Array array = c.createArrayOf("float8", values);
                ps.setString(1, opts.get("project"));
                ps.setArray(2, array);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    emit(name, row, rs.getString(1));
                }
            }
        }
    }

    private void errorThenRollback(String name) throws SQLException {
        try (Connection c = connect(); PreparedStatement ps = c.prepareStatement("SELECT pgml.embed(?, ?)")) {
            c.setAutoCommit(false);
            ps.setString(1, "no-such-model");
            ps.setString(2, "x");
            try {
                ps.executeQuery().close();
                emit(name, "no error");
            } catch (SQLException e) {
                emit(name, "sqlstate", e.getSQLState());
            }
            c.rollback();
            ps.setString(1, opts.get("model"));
            ps.setString(2, texts[0]);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                emit(name, "after", rs.getString(1));
            }
            c.commit();
        }
    }

    // Plain traffic: the same output through the proxy as directly (the test compares the two runs).
    private void plain(String name) throws SQLException {
        try (Connection c = connect()) {
            try (Statement st = c.createStatement();
                 ResultSet rs = st.executeQuery("SELECT id, body, length(body), body || '!' FROM docs ORDER BY id")) {
                dump(name, "select", rs);
            }
            try (PreparedStatement ps = c.prepareStatement(
                    "SELECT ?::int + 1, ? || 'x', ?::numeric * 2, ARRAY[?, ?]::float8[], ?::jsonb -> 'k'")) {
                for (int i = 0; i < 7; i++) {  // past prepareThreshold
                    ps.setInt(1, i);
                    ps.setString(2, "s" + i);
                    ps.setBigDecimal(3, new java.math.BigDecimal("1.25"));
                    ps.setDouble(4, i / 4.0);
                    ps.setDouble(5, 0.5);
                    ps.setString(6, "{\"k\": [1, \"two\"]}");
                    try (ResultSet rs = ps.executeQuery()) {
                        dump(name, "bound " + i, rs);
                    }
                }
            } catch (SQLException e) {
                emit(name, "bound", "!error", String.valueOf(e.getSQLState()));
            }
            c.setAutoCommit(false);
            try (Connection r = connect("reWriteBatchedInserts", "true")) {
                r.setAutoCommit(false);
                try (Statement st = r.createStatement()) {
                    st.execute("CREATE TEMP TABLE jbatch (id int, v text)");
                }
                try (PreparedStatement ps = r.prepareStatement("INSERT INTO jbatch VALUES (?, ?)")) {
                    for (int i = 0; i < 10; i++) {
                        ps.setInt(1, i);
                        ps.setString(2, "v" + i);
                        ps.addBatch();
                    }
                    ps.executeBatch();
                }
                try (Statement st = r.createStatement();
                     ResultSet rs = st.executeQuery("SELECT count(*), string_agg(v, ',' ORDER BY id) FROM jbatch")) {
                    dump(name, "batch", rs);
                }
                r.rollback();
            }
            try (Statement st = c.createStatement()) {
                st.execute("SELECT 1/0");
            } catch (SQLException e) {
                emit(name, "error", e.getSQLState());
            }
            c.rollback();
            DatabaseMetaData meta = c.getMetaData();
            try (ResultSet rs = meta.getColumns(null, "public", "docs", null)) {
                while (rs.next()) {
                    emit(name, "column", rs.getString("COLUMN_NAME"), rs.getString("TYPE_NAME"));
                }
            }
            c.commit();
        }
    }

    private static void dump(String name, String label, ResultSet rs) throws SQLException {
        ResultSetMetaData md = rs.getMetaData();
        List<String> header = new ArrayList<>(List.of(name, label, "columns"));
        for (int i = 1; i <= md.getColumnCount(); i++) {
            header.add(md.getColumnLabel(i) + ":" + md.getColumnTypeName(i));
        }
        emit(header.toArray(new String[0]));
        while (rs.next()) {
            List<String> row = new ArrayList<>(List.of(name, label, "row"));
            for (int i = 1; i <= md.getColumnCount(); i++) {
                row.add(String.valueOf(rs.getString(i)));
            }
            emit(row.toArray(new String[0]));
        }
    }

    private static void emit(String... fields) {
        StringBuilder out = new StringBuilder("[");
        for (int i = 0; i < fields.length; i++) {
            if (i > 0) {
                out.append(", ");
            }
            quote(out, fields[i]);
        }
        System.out.println(out.append(']'));
        System.out.flush();
    }

    private static void quote(StringBuilder out, String s) {
        out.append('"');
        for (char ch : s.toCharArray()) {
            switch (ch) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (ch < 0x20) {
                        out.append(String.format("\\u%04x", (int) ch));
                    } else {
                        out.append(ch);
                    }
                }
            }
        }
        out.append('"');
    }
}
