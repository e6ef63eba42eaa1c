"""Evaluate checkpoints, choose one by precision/recall, write per-image predictions (see README)."""

from geektime.cli import evaluate

if __name__ == "__main__":
    evaluate()
