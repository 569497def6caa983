"""Importing padim, fitting, scoring and drawing leave the host process as it was: glibc's malloc
settings (only ``padim.files.memory.tune_malloc_for_scoring`` changes them, when called) and matplotlib's
plotting backend (a notebook's, say)."""

import json
import os
import subprocess
import sys
import textwrap

# Runs in a fresh process. Python's audit hooks see every ctypes symbol lookup ("ctypes.dlsym"), so
# any mallopt reached through ctypes, by padim or anything it imports, is recorded.
SCRIPT = textwrap.dedent("""
    import json, sys
    looked_up = []

    def audit(event, args):
        if event == "ctypes.dlsym" and "mallopt" in str(args[-1]):
            looked_up.append(str(args[-1]))

    sys.addaudithook(audit)
    import numpy as np
    import matplotlib
    from pathlib import Path
    from padim import PaDiM
    from padim.jobs.report import roc_figure, score_histogram

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    model = PaDiM(backbone="resnet18", weights="random", image_size=64, batch_size=2, device="cpu").fit(images)
    model.predict(images)
    labels, scores = np.array([0, 0, 1, 1], bool), np.array([0.1, 0.4, 0.35, 0.8])
    out = Path(sys.argv[1])
    roc_figure(labels, scores, 0.75, (np.array([0, 1.0]), np.array([0, 1.0])), 0.5, out / "roc.png")
    score_histogram(labels, scores, 0.3, out / "hist.png")
    state = {"mallopt_after_scoring": list(looked_up), "pyplot_imported": "matplotlib.pyplot" in sys.modules,
             "backend": matplotlib.get_backend(), "pictures": sorted(p.name for p in out.iterdir())}

    from padim.files.memory import tune_malloc_for_scoring  # the explicit call does reach mallopt
    state["tuned"] = tune_malloc_for_scoring()
    state["mallopt_after_explicit_call"] = list(looked_up)
    print(json.dumps(state))
""")


def test_scoring_and_drawing_change_neither_malloc_nor_the_plotting_backend(tmp_path):
    env = {**os.environ, "MPLBACKEND": "svg"}
    env.pop("PADIM_KEEP_MALLOC", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state["pictures"] == ["hist.png", "roc.png"]
    assert state["mallopt_after_scoring"] == []
    assert state["pyplot_imported"] is False
    assert state["backend"] == "svg"
    if sys.platform.startswith("linux"):  # the probe can see a mallopt call: this test can fail
        assert state["tuned"] is True and state["mallopt_after_explicit_call"] == ["mallopt"]
