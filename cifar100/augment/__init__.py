"""Augmentation: the per-sample torchvision pipeline (`reference`), the same ops a batch at a time on
the device (`batched`), CutMix / Mixup on batches (`mixing`), and the training loaders (`loader`)."""
