"""Test instrument: every training process prints the hash of the weights it ended with.

Put this folder on PYTHONPATH and Python imports it at start in every process (launchers and
training processes alike). It records the model that `Accelerator.prepare` hands back and, when
the process exits, prints `weights-sha256 rank=R host=H <hex>`, the same hash `weights_sha256` gives a
checkpoint's model.safetensors. Training itself is untouched.
"""

from __future__ import annotations

import atexit
import hashlib
import socket


def weights_sha256(state: dict) -> str:
    """sha256 over the weights in name order: name, dtype, shape and bytes of each tensor."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _install() -> None:
    try:
        import accelerate
    except ImportError:
        return
    prepare = accelerate.Accelerator.prepare
    seen: dict = {}

    def recording_prepare(self, *args, **kwargs):
        result = prepare(self, *args, **kwargs)
        import torch

        for obj in result if isinstance(result, tuple) else (result,):
            if isinstance(obj, torch.nn.Module) and "model" not in seen:
                # Rank and the bare module now: the run releases Accelerate's state before exit.
                seen.update(model=self.unwrap_model(obj), rank=self.process_index)
        return result

    def report() -> None:
        if "model" in seen:
            rank, host = seen["rank"], socket.gethostname()
            print(f"weights-sha256 rank={rank} host={host} {weights_sha256(seen['model'].state_dict())}", flush=True)

    accelerate.Accelerator.prepare = recording_prepare
    atexit.register(report)


_install()
