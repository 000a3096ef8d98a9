"""Engine: the training loop and what plugs into it.

`train_loop` builds a run from a `TrainConfig`, resumes and steps; `hooks` (metrics, evaluation,
checkpoints) and `preemption` run around each step; `checkpoint` owns the checkpoint files,
`schedule` the LR schedule, `speed` the speed switches, `reporters` where the numbers go.
Nothing is imported here, so `trainer.engine.checkpoint` loads without the loop.
"""
