"""Process-wide machine policy (geektime.machine): how freed memory is kept for the inference entry points."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc switch")
def test_inference_entry_points_keep_freed_memory_instead_of_faulting_it_in_again():
    """After keep_freed_memory() an eval forward pass reuses the memory the previous one freed: no page faults
    (glibc's default maps and unmaps the large feature maps every pass: thousands of faults)."""
    code = textwrap.dedent(
        """
        import resource, torch
        from efficientnet_pytorch import EfficientNet
        from geektime.machine import keep_freed_memory

        torch.set_num_threads(1)
        model = EfficientNet.from_name("efficientnet-b0", num_classes=2, image_size=[160, 160]).eval()
        images = torch.randn(8, 3, 160, 160)

        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with torch.inference_mode():
                model(images)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        faults()
        default = min(faults() for _ in range(3))
        assert keep_freed_memory()
        faults()  # the heap grows to the pass's peak once
        print(default, min(faults() for _ in range(3)))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    default, kept = map(int, proc.stdout.split())
    assert default > 2_000 and kept < default / 10
