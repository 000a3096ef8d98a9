"""The driver on Ray: `run`/`resume`, the Ray adapter (cluster, pretrain tasks, the Tune run), the
autoscaler's demand, live capacity, the release order of tasks, the shared-storage check."""
