"""geektime: plain-PyTorch image classification with Hydra configs."""
