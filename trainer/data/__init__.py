"""Data: finding, checking and reading the detection data sets, and the batch stream.

COCO instances for Mask R-CNN (`coco`, with its serialised train index `coco_index`), COCO boxes and
person keypoints (`keypoints`), Pascal VOC (`voc`); the up-front checks every split passes
(`dataset_check`, `image_check`).
"""
