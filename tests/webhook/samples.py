"""The AdmissionReview samples: ``../shared/k8s-samples`` relative to the repository root.

They are part of the test suite's inputs: when the directory is absent or empty every test that
uses them FAILS (never skips), naming the path it looked at."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO.parent / "shared" / "k8s-samples"


def sample_files() -> list[Path]:
    files = sorted(SAMPLES.glob("*.json")) if SAMPLES.is_dir() else []
    assert files, f"no AdmissionReview samples in {SAMPLES} (../shared/k8s-samples beside the repository)"
    return files


# For parametrize (collection time): a missing directory yields one case that fails on reading it.
SAMPLE_FILES = (sorted(SAMPLES.glob("*.json")) if SAMPLES.is_dir() else []) or [SAMPLES / "MISSING.json"]
