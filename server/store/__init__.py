"""Persistence: the Database seam (database.py), the tables (tables.py: the detection schema, once),
SQLite (sqlite.py) and PostgreSQL (postgres.py) behind it, chosen by URL in auto.py; the session
repository, group commit, schema migrations and retention.

Guarantee: an append assigns each session's seqs consecutively and atomically, whatever the number of
nodes (no gap, no seq twice); an acked append is committed; a detection id is stored once per session."""
