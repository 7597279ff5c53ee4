"""`prefalign env`: versions and hardware, to paste into a bug report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass

PACKAGES = [
    "prefalign", "torch", "transformers", "tokenizers", "peft", "accelerate", "datasets", "safetensors",
    "trl", "vllm",
]


@dataclass
class EnvConfig:
    pass


def environment() -> dict[str, str]:
    import torch

    info = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
    }
    for package in PACKAGES:
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    info["torch_threads"] = str(torch.get_num_threads())
    info["cuda"] = torch.version.cuda or "none"
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            info[f"gpu{index}"] = (
                f"{properties.name}, {properties.total_memory / 2**30:.1f} GiB, "
                f"bf16={torch.cuda.is_bf16_supported()}"
            )
    else:
        info["gpu"] = "none"
    return info


def env(config: EnvConfig | None = None) -> dict[str, str]:
    info = environment()
    width = max(len(key) for key in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return info
