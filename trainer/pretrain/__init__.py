"""Backbone pretraining (`python -m trainer.pretrain`): classification on an ImageFolder set.

`train` owns the run and the CLI; `recipe` resolves its epoch-based schedule and joins its process
group.
"""
