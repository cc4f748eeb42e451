"""`from trainer.calibration import load_calibration`, as exported model cards print it, keeps
working: the calibration lives in trainer/eval/calibration.py."""

from trainer.eval.calibration import (  # noqa: F401
    CALIBRATION_FILE,
    METHODS,
    Calibration,
    brier_score,
    cross_validated,
    expected_calibration_error,
    fit_calibration,
    load_calibration,
    reliability,
    uncalibrated,
)
