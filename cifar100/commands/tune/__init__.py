"""`cifar100 tune`: successive halving over a search file within a budget of process time."""
