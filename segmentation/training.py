"""What FCN-32s segmentation supplies to the training runner (:mod:`common.runner`): SBD /
VOC images and labels, FCN-32s on a masked (or finetuned) VGG-16 from its backbone source,
the per-pixel loss and the FCN metrics, and what the artifact and ``metrics.json`` record
(the metrics per class and a storage report).

What ``auto`` means here: compiling off (images differ in size, and inductor specialises
FCN training to each size), fp32, no channels_last.
"""
from __future__ import annotations

from torch.utils.data import DataLoader

from common.distributed import make_sampler
from common.loaders import build_loader, set_loader_epoch
from common.runner import Data, TrainingTask
from common.runtime import AutoPolicy

from .data import NUM_CLASSES, build_split, class_names, pad_collate
from .engine import SegmentationPipeline, summarize
from .report import format_metrics, format_storage, storage_report
from .runs import prepare_model
from .weights import resolve_backbone

__all__ = ["SegmentationTask", "segmentation_loaders"]


def segmentation_loaders(cfg, convention: str, dist_info):
    """The training loader and the evaluation loader (one image per batch: padding to a
    common size would change the predictions near borders)."""
    train_set = build_split(cfg.split, "train", cfg.data_root, convention, cfg.val_list)
    val_set = build_split(cfg.split, "val", cfg.data_root, convention, cfg.val_list)
    train = build_loader(train_set, batch_size=cfg.batch_size, train=True, workers=cfg.loader_workers,
                         dist_info=dist_info, seed=cfg.seed, pin_memory=dist_info.device.type == "cuda",
                         collate_fn=pad_collate)
    val = DataLoader(val_set, batch_size=1, sampler=make_sampler(val_set, dist_info, False, 0),
                     num_workers=cfg.loader_workers, collate_fn=pad_collate)
    return train, val


class SegmentationTask(TrainingTask):
    policy = AutoPolicy(compile_cuda=False, compile_distributed=False, channels_last="never",
                        fixed_input_size=False, dynamic_shapes=True)

    def __init__(self, cfg, dist, log=print):
        super().__init__(cfg, dist, log)
        self.source = resolve_backbone(cfg.arch, cfg.backbone, cfg.caffe_weights, cfg.random_init)

    def build_data(self, runtime) -> Data:
        train, val = segmentation_loaders(self.cfg, self.source.convention, self.dist)
        return Data(train, val, lambda epoch: set_loader_epoch(train, epoch))

    def build_model(self, runtime, data):
        """FCN-32s, prepared for the method at once (its random parts draw from the run's
        seed alone, so training and a later evaluation build the same network)."""
        cfg, source = self.cfg, self.source
        model, self._prepared = prepare_model(cfg.arch, cfg.method, source, seed=cfg.seed,
                                              learn_upsample=cfg.learn_upsample, masks=cfg.mask_settings())
        return model, (), {"backbone_kind": source.kind,
                          "backbone_path": str(source.path.resolve()) if source.path else None,
                          "input_convention": source.convention, "num_classes": NUM_CLASSES}

    def prepare(self, model, head):
        return self._prepared

    def announce(self, model, prepared, data, runtime, facts) -> str:
        cfg = self.cfg
        compiled = ("--compile: inductor compiles FCN training once per distinct input size (H x W); expect a "
                    "compilation at each new size until torch's recompile limit\n" if runtime.compile else "")
        return (f"{compiled}{cfg.method} FCN-32s on {cfg.arch} from {self.source.describe()}; --split {cfg.split}: "
                f"{len(data.train.dataset)} train / {len(data.eval.dataset)} eval images; {self.dist.world_size} "
                f"process(es) on {runtime.device}")

    def build_pipeline(self, runtime, data, model):
        return SegmentationPipeline(runtime.device, data.eval, NUM_CLASSES, amp=runtime.prec.amp,
                                    print_freq=10 * self.cfg.print_freq, is_main=self.dist.is_main, header="eval")

    def results(self, model, data, result, facts, pipeline):
        cfg = self.cfg
        names = class_names()
        val_set = data.eval.dataset
        summary = {"split": cfg.split, "method": cfg.method, "arch": cfg.arch, "backbone": self.source.kind,
                   "epochs": cfg.epochs, "eval_images": len(val_set), **summarize(result.evaluation, names),
                   "storage": storage_report(model), "collapse": result.collapse}
        if getattr(val_set, "listed", None) is not None:
            summary["eval_listed"] = val_set.listed
        meta = {"arch": cfg.arch, "method": cfg.method, "split": cfg.split, "learn_upsample": cfg.learn_upsample,
                "input_convention": self.source.convention, "backbone_kind": self.source.kind,
                "num_classes": NUM_CLASSES, "seed": cfg.seed, "backbone_path": facts["backbone_path"]}
        return meta, summary, f"done: mean IoU {100 * summary['mean_iou']:.2f}%"

    def report(self, metrics) -> str:
        return format_metrics(metrics, class_names()) + "\n" + format_storage(metrics["storage"])
