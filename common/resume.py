"""Whether a run folder may be resumed by the run about to start, and from what.

A run folder holds ``checkpoint.pt`` (every setting of the run, its backbone's fingerprint,
the epochs done) and ``config.json`` (the same settings, for people). A resume is refused,
with one line saying what differs and what to do, when the new settings differ from the
checkpoint's beyond those free to change (``epochs`` may only grow; a configuration
declares the others with ``resume="free"``), when the folder is another command's run,
when ``config.json`` was edited or broken since the run wrote it, when the backbone is
another one, or when fewer epochs are asked than the checkpoint holds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from common.checkpoint import changed_settings, load_training_checkpoint
from common.errors import ResumeError
from common.runlog import RunDir
from common.settings import PROVENANCE_KEYS, RESOLVED_KEY

__all__ = ["CHECKPOINT", "MAY_CHANGE_ON_RESUME", "resume_point"]

CHECKPOINT = "checkpoint.pt"
# ``epochs`` may only grow; what else may differ on resume is declared with the fields of
# the run's configuration (common.config: ``resume="free"``) and passed as ``may_change``.
MAY_CHANGE_ON_RESUME = frozenset({"epochs"})


def _other_command(run: RunDir, saved: Mapping[str, Any], now: Mapping[str, Any]) -> Optional[str]:
    """One line naming the command whose run ``run`` is, when its settings are not those of
    this command's runs at all (another pipeline's run folder); None otherwise."""
    only = (set(saved) ^ set(now)) - {RESOLVED_KEY}
    if len(only) < 3:
        return None
    command = "another command"
    try:
        line = json.loads(run.file(RunDir.CONFIG).read_text(encoding="utf-8")).get("command_line") or []
        parts = Path(line[1]).with_suffix("").parts[-2:] if len(line) > 1 else ()
        if len(parts) == 2 and parts[1] in ("train", "pretrain"):
            command = f"python -m {'.'.join(parts)}"
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    what = f" (task {saved['task']!r})" if isinstance(saved.get("task"), str) else ""
    return (f"{run.path} is the run folder of {command}{what}, whose settings are not this command's; "
            f"it is left untouched: choose another --out")


def _check_config_file(run: RunDir, settings: Mapping[str, Any], may_change, absent) -> None:
    """Refuse a run folder whose config.json was broken or edited by hand since the run wrote
    it (beyond the settings free to change): a resumed run keeps its checkpoint's settings,
    and an edit would otherwise be overwritten without a word."""
    path = run.file(RunDir.CONFIG)
    if not path.is_file():
        return
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(written, dict):
            raise ValueError(f"it holds a {type(written).__name__}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResumeError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); it records this run's settings, "
                          f"which its checkpoint also holds: restore the file, or delete it to have it written "
                          f"again from the checkpoint") from None
    written = {k: v for k, v in written.items() if k not in PROVENANCE_KEYS}
    edited = changed_settings(settings, written, may_change, absent)
    if edited:
        raise ResumeError(f"{path} was edited after the run wrote it ({'; '.join(edited[:4])}"
                          f"{'; ...' if len(edited) > 4 else ''}; 'there' is the checkpoint): a resumed run keeps "
                          f"its settings; undo the edit, or start a new run from it with --config {path} --out "
                          f"ANOTHER_FOLDER")


def resume_point(run: RunDir, config: Dict[str, Any], epochs: int, fingerprint, may_change,
                  absent: Mapping[str, Any]) -> Optional[dict]:
    """The checkpoint to resume from (None for a fresh run), after every check passed."""
    path = run.file(CHECKPOINT)
    if not path.exists():
        return None
    ckpt = load_training_checkpoint(path)
    _check_config_file(run, ckpt["settings"], may_change, absent)
    differ = changed_settings(ckpt["settings"], config, may_change, absent)
    other = _other_command(run, ckpt["settings"], config)
    if other:
        raise ResumeError(other)
    if differ:
        raise ResumeError(f"{path} was written with other settings ({'; '.join(differ)}); run with "
                          f"the same flags to resume, or choose another --out")
    if ckpt["fingerprint"] != fingerprint:
        raise ResumeError(f"{path} was trained on another backbone (fingerprint {ckpt['fingerprint']}, "
                          f"now {fingerprint}); use the backbone it was trained on or another --out")
    if epochs < int(ckpt["epoch"]):
        raise ResumeError(f"{path} already holds {ckpt['epoch']} epochs; --epochs {epochs} is fewer. "
                          f"Pass --epochs {ckpt['epoch']} or more to resume, or choose another --out")
    return ckpt
