"""Optimizers as ``init``/``update`` pairs of pure functions, one primitive per module (TorchOpt's layout).

base (the pair, its state, apply_updates), sgd, adam, clip, schedule, unroll
(the differentiable inner loop) and torch_optim (any pair as a torch.optim.Optimizer).
"""
