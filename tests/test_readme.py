"""The README's Python example runs (issue 19): executed as written, with only its data root pointed at
a synthetic category named like MVTec's and its backbone made offline (random weights, 64 px): the
API calls, attributes and the errors="record" lines are the README's own."""

from __future__ import annotations

import re
from pathlib import Path

from padim.data.synthetic import make_synthetic_category

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert 'find_category("~/data/mvtec_ad", "bottle"' in block and 'PaDiM(backbone="resnet18", image_size=256)' in block
    make_synthetic_category(tmp_path / "mvtec_ad", name="bottle", n_train=44, n_test_good=2, n_test_per_defect=1,
                            size=64)
    code = block.replace("~/data/mvtec_ad", str(tmp_path / "mvtec_ad")).replace(
        'PaDiM(backbone="resnet18", image_size=256)', 'PaDiM(backbone="resnet18", weights="random", image_size=64)')
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    result = scope["result"]
    assert result.index.tolist() == [0, 1] and result.errors[0][:2] == (2, "missing.png")
    assert (tmp_path / "bottle.safetensors").is_file()
