"""Multi-host tests: real daemons in network namespaces on one machine (needs root)."""
