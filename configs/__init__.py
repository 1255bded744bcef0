"""Experiment configs: one `get_config(arg)` per file; pass them as `--config=configs/<name>.py[:fold=2,steps=100]`."""
