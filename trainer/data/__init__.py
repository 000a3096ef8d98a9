"""Data: finding, checking and reading the detection data sets, and the batch stream.

COCO instances for Mask R-CNN (`coco`, with its serialised train index `coco_index`, and the batch
stream every detector trains on), COCO boxes and person keypoints (`keypoints`) and Pascal VOC (`voc`),
whose items and flips follow `split.DetectionSplit`; the up-front checks every split passes
(`dataset_check`, `image_check`).
"""
