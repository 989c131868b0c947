"""What a new user meets first: output that reads in a log (no terminal), counts that say what they count."""

import subprocess
import sys

from imgcls.models import count_parameters, create_model


def imgcls_piped(*args: str) -> str:
    """stdout of `imgcls ARGS` into a pipe, as in a CI log: no terminal, no COLUMNS."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    done = subprocess.run([sys.executable, "-m", "imgcls", *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_models_in_a_log_is_one_line_per_model_and_says_which_parameters_it_counts():
    out = imgcls_piped("models")
    header = next(line for line in out.splitlines() if "name" in line)
    assert "backbone" in header and "head (classes)" in header and "description" in header  # one header row
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    lite0 = rows["efficientnet_lite0"].split("│")
    model = create_model("efficientnet_lite0", 10)
    backbone = count_parameters(model) - count_parameters(model.get_classifier())
    # the backbone is what a 10-class run has, less its head; the 1000-class head is shown apart
    assert lite0[2].strip() == f"{backbone / 1e6:.2f}M" and lite0[3].strip() == "1.28M (1000)"
    assert "a head for its own classes" in out
