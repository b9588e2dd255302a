"""Training: the loop and `megatiny train` (`loop.py`), one optimizer step over any layout
(`step.py`: Trainer), the optimizer and schedule (`optim.py`), checkpoints (`checkpoint.py`) and
metrics (`metrics.py`)."""
