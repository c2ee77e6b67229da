"""The SQL store: schema, connection, migrations and the queries the pipeline makes."""
