"""Masked layers (their scores and masks), mask selection (top-k at a keep ratio, per layer,
global, N:M, with floors and skips) and collapse detection. Imports nothing above bip.config."""
