"""Semantic segmentation with piggyback masks: FCN-32s on a masked VGG-16 for PASCAL VOC.

Entry points: ``python -m segmentation.train``, ``python -m segmentation.evaluate`` and
``python -m segmentation.demo``. See ``segmentation/README.md``.
"""
