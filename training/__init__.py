"""Training-side tools: the synthetic trunk phantom, sparse labels, and the demo model's training script."""
