"""Tools for tests and benchmarks: a dispatch-mode recorder of host syncs (synccheck) and a
torch.compile graph counter (compile). Nothing in the training path imports them."""
