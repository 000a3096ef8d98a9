"""Offline synthetic data sets (`python -m trainer.synthetic`): COCO-layout shapes, person keypoints,
Pascal VOC, and an ImageFolder classification set.

`datasets` owns the on-disk layouts, `cli` the command line, `draw` the drawing, `keypoints` and `voc`
their sets.
"""
