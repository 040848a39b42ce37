"""Detector parts: anchors, box coding, matching, sampling, RPN, RoI heads, YOLO head, post-processing."""
