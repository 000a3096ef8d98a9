"""Evaluation: inference over a data set and scoring it (COCO bbox/segm/keypoints, VOC mAP).

`inference` owns the one inference loop (`inference_on_dataset(model, loader, evaluator)`) and the
evaluator protocol (reset / process(inputs, outputs) / evaluate() -> dict); `coco` (Mask R-CNN: bbox
and segm, and the COCO scoring every COCO evaluator uses), `keypoints` (box and keypoint detectors)
and `voc` (VOC mAP) are its evaluators; `convert` turns model outputs into COCO results.
"""
