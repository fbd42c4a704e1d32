"""The ``fastpath`` table in the graph, and building it from OONI's open bucket."""
