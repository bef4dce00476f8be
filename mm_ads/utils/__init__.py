"""Utilities: atomic file and directory writes (`io`), progress lines (`progress`), TensorFlow's quiet start-up
(`tf_startup`)."""
