"""The sweep's definition, without Ray or torch: the spec and its `--set` overrides, the grid's expansion into
pretrain jobs and trials, schedule forking, `plan`'s cost table, the gang fit count, the dataset's presence."""
