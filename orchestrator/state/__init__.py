"""A sweep's folder on disk: its identity, stored spec and trials' progress, what finished trials keep, the
driver's log file."""
