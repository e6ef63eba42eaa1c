"""Train an image classifier: `python train.py [group=choice ...] [key=value ...]` (see README)."""

from geektime.cli import train

if __name__ == "__main__":
    train()
