"""``python -m decathlon.import_backbone FILE --out PATH``: a published decathlon backbone (the
residual adapters' ResNet-26 ``.t7``, a state-dict copy of it, an external WRN state dict)
converted once into this toolkit's backbone file: safetensors, with the architecture, its
options, the input preprocessing, the file's own ImageNet accuracy and the source file's
SHA-256. ``decathlon.train --backbone PATH`` then reads it without the original file.
Nothing in FILE is run (:mod:`common.torchfile`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar, Optional

from common.errors import UsageError
from common.settings import Settings, option
from decathlon.models import import_backbone
from decathlon.networks import model_names

__all__ = ["ImportBackboneConfig", "get_args_parser", "main", "cli"]


@dataclass(frozen=True)
class ImportBackboneConfig(Settings):
    PROG: ClassVar[str] = "python -m decathlon.import_backbone"
    DESCRIPTION: ClassVar[str] = ("Convert a published decathlon backbone file (the ResNet-26 of the residual "
                                  "adapters, a state dict of it, an external WRN) into this toolkit's backbone "
                                  "file.")

    file: Optional[str] = option(None, "the published backbone file", metavar="FILE", positional=True, path=True)
    out: Optional[str] = option(None, "the backbone file to write (.safetensors)", metavar="PATH", path=True)
    arch: Optional[str] = option(None, "the file's network", group="input", choices=model_names,
                                 default_text="from the file; else wrn28_4")

    def check(self) -> None:
        super().check()
        if self.out is None:
            raise UsageError("--out is required: the backbone file to write")


def get_args_parser():
    return ImportBackboneConfig.parser()


def main(cfg: ImportBackboneConfig) -> dict:
    meta = import_backbone(cfg.file, cfg.out, cfg.arch)
    options = meta.get("arch_options") or {}
    print(f"wrote {cfg.out}: {meta['arch']} {options or ''}, preprocessing {meta['preprocess']}, source SHA-256 "
          f"{meta['source_sha256'][:16]}...; use it with python -m decathlon.train --backbone {cfg.out}")
    return meta


def cli(argv=None) -> int:
    return ImportBackboneConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
