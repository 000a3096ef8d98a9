"""The simulation harness the tests and the benchmarks share (no pytest here): tiny sweep specs and the
CLI runner, a real MLflow server process, a local Ray cluster under Ray's own fake autoscaler, the load
sweep's shape. It lives with the benchmarks so a benchmark measures exactly what a test proves without
importing the test suite; the tests import it from here."""
