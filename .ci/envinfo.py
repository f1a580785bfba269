"""Print the facts of a CI run that decide its numbers: the machine, then the installed versions.

`python3 .ci/envinfo.py --machine` (before the install, any Python 3) prints the platform, the
Python, the CPU and its int8-relevant flags, the cores and the memory. Without `--machine` (the
venv's Python, `make env-info`) it prints the CPU flags line, the versions of the packages that
matter and onnxruntime's providers. Standard library only, apart from importing onnxruntime.
"""

import importlib.metadata
import os
import platform
import sys

# onnxruntime's int8 kernels take a different path with and without VNNI (ENVIRONMENT.md).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
PACKAGES = ("torch", "torchvision", "onnxruntime-gpu", "onnxruntime", "onnx", "onnxscript",
            "numpy", "prefect", "mlflow", "dvc")


def cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and flags from /proc/cpuinfo (empty where there is none)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


def flags_line() -> str:
    model, flags = cpuinfo()
    present = " ".join(f"{flag}={'yes' if flag in flags else 'no'}" for flag in FLAGS)
    return f"cpu: {model}; {present}"


def memory_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        return "unknown"


def os_name() -> str:
    try:
        return platform.freedesktop_os_release()["PRETTY_NAME"]
    except (OSError, KeyError):
        return f"{platform.system()} {platform.release()}"


def machine() -> None:
    print(f"machine: {platform.machine()}, {os_name()}, kernel {platform.release()}")
    print(f"python: {platform.python_version()} ({sys.executable})")
    print(flags_line())
    print(f"cores: {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))}); memory: {memory_gib()}")


def versions() -> None:
    print(flags_line())
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            if name != "onnxruntime":  # the project installs onnxruntime-gpu, which provides it
                found.append(f"{name} missing")
    print("versions: " + ", ".join(found))
    try:
        import onnxruntime
        print("onnxruntime providers: " + ", ".join(onnxruntime.get_available_providers()))
    except ImportError as err:
        print(f"onnxruntime providers: not importable ({err})")


if __name__ == "__main__":
    if "--machine" in sys.argv[1:]:
        machine()
    else:
        versions()
