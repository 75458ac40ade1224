"""Per-batch update rules: the only thing that differs between methods in the one loop.

A Method prepares the model for its stage (score init, masks, which tensors train), owns its
optimizers, and turns a step's batches into parameter updates. ``step`` returns on-device
tensors (loss, correct, n) so the loop syncs with the device only when it logs.

| method   | trains                                   | mask                                 |
|----------|------------------------------------------|--------------------------------------|
| dense    | everything (pretrain)                    | none                                 |
| finetune | weights, biases, BN; pruned weights = 0  | fixed, from the source               |
| hydra    | scores (+ BN affine); weights frozen     | top-k of |scores|, every step        |
|  (ref.)  | prune.variant=reference: the released HYDRA run (bip.methods.reference.HydraReference) |
| bip      | lower: weights on batch V; upper: scores | top-k of |scores|, every step        |
|  (fused) | bip.variant=fused: both levels from one pass on one batch (fused.py)          |
| omp      | nothing (one-shot, finetune afterwards)  | magnitude (global, per layer or N:M) |
| random   | nothing (one-shot, finetune afterwards)  | random                               |
| imp      | weights, one round per run (imp.py)      | -20% of the parent's by magnitude    |

One module per family (dense, hydra, bilevel, fused, oneshot, imp, reference) over ``base.Method``;
``registry.create_method`` picks one from an explicit table. This ``__init__`` imports nothing,
so the torch-free lineage arithmetic (``imp_levels``) is cheap for the launcher to import.
"""
