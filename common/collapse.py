"""Noticing a training collapse from window means, without a host read per step.

The training loop sums the loss (and, for classifiers, the number of correct examples) on
the device and reads the sums only every ``print_freq`` steps and at the end of each
epoch. Each read gives one *window*: the mean loss and accuracy of the steps since the
previous read. :class:`CollapseMonitor` keeps a smoothed loss and a smoothed accuracy
(exponential moving averages over windows, a short window weighing less than a full one),
the running minimum of the one and the maximum of the other (both from the window after
``warmup_windows`` on), and reports a collapse the first time

- the smoothed loss rises above ``loss_ratio`` times its running minimum and by at least
  ``loss_margin`` (a masked network whose masks all switched off predicts a constant:
  its loss returns to about ln(classes)); or
- for a classifier, the smoothed loss, after having been below the loss of a uniform
  guess, ln(1 / chance), rises above it by ``chance_margin`` (the network now does worse
  than guessing: what a collapse early in training looks like, before accuracy had a
  chance to rise); or
- a window's loss grows to ``blowup`` times (and by at least ``loss_margin`` over) the
  first window's, or, for a classifier, the uniform guess's when that is larger: a
  learning rate far too high sends the loss up by orders of magnitude from the first
  steps on, with no minimum to rise from, and is seen at once (no warm-up); or
- for a classifier, the smoothed accuracy has not risen above ``fall`` times chance by
  the end of epoch ``stuck_epochs`` (a run at chance from its first steps on, with no
  minimum to rise from: nothing is being learnt); or
- the smoothed accuracy, after having risen to ``rise`` times chance or more, falls back
  to at most ``fall`` times chance. Windows of fewer than ``min_examples`` examples do
  not count for accuracy (a handful of examples is too noisy to call a collapse).

A collapse is reported once (the first one), with the global step that ended the window
in which it was seen, and training goes on: it is a diagnosis, not a stop.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

__all__ = ["CollapseMonitor"]


class CollapseMonitor:
    def __init__(self, chance: Optional[float] = None, *, loss_ratio: float = 2.0,
                 loss_margin: float = 0.5, rise: float = 3.0, fall: float = 1.5,
                 warmup_windows: int = 2, smoothing: float = 0.5, min_examples: int = 64,
                 chance_margin: float = 0.25, blowup: float = 100.0, stuck_epochs: int = 2):
        self.chance = chance
        self.chance_margin = float(chance_margin)
        self.blowup = float(blowup)
        self.stuck_epochs = int(stuck_epochs)
        self.first_loss: Optional[float] = None
        self.loss_ratio, self.loss_margin = float(loss_ratio), float(loss_margin)
        self.rise, self.fall = float(rise), float(fall)
        self.warmup_windows, self.smoothing = int(warmup_windows), float(smoothing)
        self.min_examples = int(min_examples)
        self.windows = 0
        self.acc_windows = 0
        self.typical_steps = 0.0
        self.smoothed: Optional[float] = None
        self.min_loss: Optional[float] = None
        self.smoothed_acc: Optional[float] = None
        self.best_acc: Optional[float] = None
        self.event: Optional[Dict[str, Any]] = None

    def update(self, *, loss: float, steps: int, step: int, epoch: int,
               accuracy: Optional[float] = None, examples: int = 0) -> Optional[Dict[str, Any]]:
        """Feed one window (mean ``loss`` and ``accuracy`` over ``steps`` steps and
        ``examples`` examples, ending at global ``step``); returns the collapse event when
        this window reveals the first one, else None."""
        if steps < 1 or not math.isfinite(loss):
            return None
        self.windows += 1
        self.typical_steps = max(self.typical_steps, float(steps))
        # A short window (the end of an epoch) moves the averages less than a full one.
        alpha = self.smoothing * min(1.0, steps / self.typical_steps)
        self.smoothed = loss if self.smoothed is None else (1 - alpha) * self.smoothed + alpha * loss
        settled = self.windows > self.warmup_windows
        reason = None
        guess = -math.log(self.chance) if self.chance and 0 < self.chance < 1 else None
        if self.first_loss is None:
            self.first_loss = loss
        reference = max(self.first_loss, guess or 0.0)
        if reference > 0 and loss > self.blowup * reference and loss - reference >= self.loss_margin:
            start = "the uniform guess's" if guess is not None and guess >= self.first_loss else "the first window's"
            reason = (f"training loss {loss:.4g} is {loss / reference:.3g}x {start} {reference:.4f}: it grew by "
                      f"orders of magnitude (a learning rate far too high?)")
        if reason is None and settled and self.min_loss is not None and self.smoothed > self.loss_ratio * self.min_loss \
                and self.smoothed - self.min_loss >= self.loss_margin:
            reason = (f"smoothed training loss {self.smoothed:.4f} rose above "
                      f"{self.loss_ratio:g}x its minimum {self.min_loss:.4f}")
        if reason is None and settled and guess is not None and self.min_loss is not None \
                and self.min_loss < guess and self.smoothed > guess + self.chance_margin:
            reason = (f"smoothed training loss {self.smoothed:.4f} rose above {guess:.4f}, the loss of a "
                      f"uniform guess, after reaching {self.min_loss:.4f}")
        if settled:
            self.min_loss = self.smoothed if self.min_loss is None else min(self.min_loss, self.smoothed)
        if accuracy is not None and self.chance and examples >= self.min_examples:
            self.acc_windows += 1
            self.smoothed_acc = accuracy if self.smoothed_acc is None else \
                (1 - alpha) * self.smoothed_acc + alpha * accuracy
            risen = self.best_acc is not None and self.best_acc >= self.rise * self.chance
            if reason is None and risen and self.smoothed_acc <= self.fall * self.chance:
                reason = (f"smoothed training accuracy fell to {100 * self.smoothed_acc:.2f}% (chance "
                          f"{100 * self.chance:.2f}%) after reaching {100 * self.best_acc:.2f}%")
            if self.acc_windows > self.warmup_windows:
                self.best_acc = self.smoothed_acc if self.best_acc is None else max(self.best_acc, self.smoothed_acc)
            if reason is None and epoch > self.stuck_epochs and self.best_acc is not None \
                    and self.best_acc <= self.fall * self.chance:
                reason = (f"smoothed training accuracy never rose above {100 * self.best_acc:.2f}% (chance "
                          f"{100 * self.chance:.2f}%) in {self.stuck_epochs} epochs: nothing is being learnt")
        if reason is None or self.event is not None:
            return None
        self.event = {"step": int(step), "epoch": int(epoch), "reason": reason, "window_loss": loss,
                      "smoothed_loss": self.smoothed, "min_loss": self.min_loss, "window_accuracy": accuracy,
                      "smoothed_accuracy": self.smoothed_acc}
        return self.event

    def state_dict(self) -> Dict[str, Any]:
        return {key: getattr(self, key) for key in self._STATE}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in self._STATE:
            setattr(self, key, state.get(key, getattr(self, key)))

    _STATE = ("windows", "acc_windows", "typical_steps", "smoothed", "min_loss", "smoothed_acc",
              "best_acc", "event", "first_loss")
