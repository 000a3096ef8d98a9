"""A sweep's folder on disk (driver side): its identity, stored spec and trials' progress, the driver's log file."""
