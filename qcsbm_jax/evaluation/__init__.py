"""Evaluation of trained score models: metrics (toy.py, images.py) computed by jitted,
sharded programs (programs.py), written by outputs.py, driven by runner.py (--mode eval
and --mode sample). Import the modules themselves: runner.py loads the TensorBoard
writer (and with it TensorFlow), which notebooks using programs.py do not need."""
