"""The trained testbed: a generated scene world, its training, its checker and its scorer.

SDXL's weights and COCO cannot be downloaded here, and random weights show nothing about
quantization; this package makes a small SDXL-shaped model that has learned something, and the
measurements that say how well (caption accuracy, testbed-CLIP, testbed-FID).
"""
