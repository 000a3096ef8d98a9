"""Models: the ResNet-FPN detectors built from a `ModelConfig`, and their initialisation.

`model` builds Mask R-CNN, `detectors` dispatches on `model.task` (the detection task) to the box
and keypoint detectors and their data and evaluation, `backbone` owns the ResNet body shared with
pretraining, `imagenet_weights` reads and maps ImageNet weight files.
"""
