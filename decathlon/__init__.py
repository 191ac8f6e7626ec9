"""Visual Decathlon pipeline: piggyback masks for the nine decathlon tasks on one frozen
ImageNet-trained Wide ResNet.

Modules: ``tasks`` (the task registry), ``synthetic`` (a toy tree in the real format),
``data`` / ``transforms`` / ``cache`` (loading), ``models`` (backbones and their files),
``methods`` (piggyback and the baselines), ``engine`` (the loops), and the commands
``python -m decathlon.pretrain`` and ``python -m decathlon.train``; scoring, submission
and the demo build on them.
"""
