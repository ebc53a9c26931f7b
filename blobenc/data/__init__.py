"""Dataset readers (Algonauts 2023 layout) and the synthetic dataset."""
