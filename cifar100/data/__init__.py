"""The data: CIFAR-100 read into uint8 tensors (`cifar`), the per-sample torchvision pipeline
(`reference`), the same ops a batch at a time on the device (`batched`), CutMix / Mixup on batches
(`mixing`), and the training loaders (`loader`)."""
