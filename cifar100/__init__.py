"""cifar100: CIFAR-100 experiments as YAML recipes, trained with Accelerate on one CPU, one GPU or many."""

__version__ = "0.1.0"
