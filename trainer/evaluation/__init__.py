"""Evaluation: inference over a data set and scoring it (COCO bbox/segm/keypoints, VOC mAP).

`coco` scores COCO results (pycocotools or faster-coco-eval), `convert` turns model outputs into COCO
results, `keypoints` and `voc` evaluate the box, keypoint and VOC detectors.
"""
