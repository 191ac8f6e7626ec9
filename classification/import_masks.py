"""``python -m classification.import_masks FILE --arch ARCH --weights W --out DIR``: the piggyback
authors' released masks (a packed masks file of several datasets) or one of their training
checkpoints, as this toolkit's mask files ``DIR/<dataset>.safetensors`` (1 bit per weight,
2 for ternary masks, the classifier included), each checked layer by layer against the
torchvision network ``ARCH`` with the ImageNet weights ``W``. ``classification.evaluate
DIR/<dataset>.safetensors --data-root DATA`` then scores one with the authors' test
preprocessing. Nothing in FILE is run (:mod:`common.torchfile`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar, List, Optional

from common.errors import UsageError
from common.settings import Settings, option
from classification.published import ARCHS, convert_published

__all__ = ["ImportMasksConfig", "get_args_parser", "main", "cli"]


@dataclass(frozen=True)
class ImportMasksConfig(Settings):
    PROG: ClassVar[str] = "python -m classification.import_masks"
    DESCRIPTION: ClassVar[str] = ("Convert the piggyback authors' released masks (packed masks file) or a training "
                                  "checkpoint of their code into this toolkit's mask files, one per dataset.")

    file: Optional[str] = option(None, "the authors' packed masks file or training checkpoint", metavar="FILE",
                                 positional=True, path=True)
    arch: Optional[str] = option(None, "the network the masks are for", group="input",
                                 choices=tuple(sorted(ARCHS)), default_text="a checkpoint's")
    weights: Optional[str] = option(None, "torchvision ImageNet weights: a path, cached file name or imagenet", group="input",
                                    metavar="FILE")
    out: Optional[str] = option(None, "folder receiving DIR/<dataset>.safetensors", metavar="DIR", path=True)

    def check(self) -> None:
        super().check()
        for name in ("weights", "out"):
            if getattr(self, name) is None:
                raise UsageError(f"--{name} is required")


def get_args_parser():
    return ImportMasksConfig.parser()


def main(cfg: ImportMasksConfig) -> List[str]:
    written = convert_published(cfg.file, cfg.arch, cfg.weights, cfg.out)
    print(f"wrote {len(written)} mask file(s) to {cfg.out}; score one with python -m classification.evaluate "
          f"{written[0]} --data-root DATA")
    return [str(p) for p in written]


def cli(argv=None) -> int:
    return ImportMasksConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
