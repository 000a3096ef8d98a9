"""MLflow: the sweep's runs and their metrics (the only place that imports mlflow), the one path that carries
a trial's metric rows to it (metric_sync), and what runs say about themselves (run_notes)."""
