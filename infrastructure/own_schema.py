"""Where daybook looks for a PostgreSQL table before using it: in the session's own schema.

daybook makes its tables in the session's schema (the first of the ``search_path`` that
exists). An unqualified ``to_regclass('name')`` searches the whole ``search_path``: with one
that lists the ledger's schema, then ``public``, a table the ledger's schema does not have
yet was found in ``public``, another ledger's, and used. Looked for here only, a table found
is also the one its unqualified name reaches (the session's schema comes first).
"""

#: SQL: the table (or index) named by the one parameter, in the session's schema; else NULL.
IN_OWN_SCHEMA = "to_regclass(quote_ident(current_schema()) || '.' || %s)"
