"""The GPU device check runs where CUDA exists and says plainly that it cannot where it does not."""

import subprocess
import sys

import torch


def test_gpu_check_command():
    out = subprocess.run([sys.executable, "-m", "jobs.doors.gpu_check"], capture_output=True, text=True, timeout=600)
    if torch.cuda.is_available():
        assert out.returncode == 0, out.stderr
        assert "short_fp16_texts_per_s = " in out.stdout and "long_min_cosine = " in out.stdout
    else:
        assert out.returncode == 2 and out.stdout.strip() == "no CUDA device: nothing to check"
