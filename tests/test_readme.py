"""The README's masking-API snippet runs as printed (on the CPU, nothing downloaded)."""
import re
from pathlib import Path

import torch

from common.masking import is_piggybacked

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PLACEHOLDER = "# ... train ..."
# One real optimisation step in place of the placeholder, so that the saved masks and head
# are the trained ones.
TRAIN_STEP = """\
x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 150])
before = [m.detach().clone() for m in mask_parameters(model)]
model.train()
torch.nn.functional.cross_entropy(model(x), y).backward()
opt.step()
model.eval()
"""


def masking_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### The masking API"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md: no ```python block under '### The masking API'"
    return blocks[0]


def test_masking_snippet_runs_as_printed(tmp_path, monkeypatch):
    code = masking_snippet()
    assert TRAIN_PLACEHOLDER in code
    monkeypatch.chdir(tmp_path)  # the snippet writes cubs.safetensors to the working folder
    torch.set_num_threads(1)
    namespace = {"__name__": "readme_snippet"}
    exec(compile(code.replace(TRAIN_PLACEHOLDER, TRAIN_STEP), "README.md", "exec"), namespace)

    model, plain, multi = namespace["model"], namespace["plain"], namespace["multi"]
    assert (tmp_path / "cubs.safetensors").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(namespace["before"], namespace["mask_parameters"](model)))
    assert namespace["logits"].shape == (1, 200)
    # folded and multi-task models give the masked model's outputs
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.eval()(x)
        assert torch.allclose(plain.eval()(x), reference, atol=1e-5)
        assert torch.allclose(multi(x), reference, atol=1e-5)
    assert not is_piggybacked(plain) and is_piggybacked(model)


def test_help_texts_say_what_a_user_types():
    from benchmarks import gpu, run
    from decathlon import networks, submit
    for module, prog in ((run, "python -m benchmarks.run"), (gpu, "python -m benchmarks.gpu")):
        assert module.get_args_parser().format_usage().startswith(f"usage: {prog} ")
    helps = {a.dest: a.help for a in submit.get_args_parser()._actions}
    assert "training process" not in helps["workers"] and "test images" in helps["workers"]
    # the architecture names --arch accepts, for the commands' help texts
    assert {"wrn28_4", "wrn10_1", "resnet26"} <= set(networks.model_names())
    assert networks.model_names() == sorted(networks.MODELS)
