"""How a device installs a bundle's wheel: one row per kind of device, the pyproject extra it takes.

The main README's "Deploying on Jetson" and every bundle's README print this table
(`install_table`), and tests/test_bundle_install.py checks that both show it and that every extra
it names is one of pyproject.toml's: the extras' names are written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

VENV = "~/mtlora"


@dataclass(frozen=True)
class DeviceInstall:
    """One kind of device: where its TensorRT comes from and the extra of the wheel it installs."""

    device: str
    system: str  # OS release and Python
    cuda: str
    tensorrt: str  # its version and where it comes from
    extra: str
    also: str = ""  # packages installed beside the wheel (NVIDIA's TensorRT wheel on x86_64)
    # Jetson: the venv sees the TensorRT bindings JetPack installs with apt; TensorRT is never
    # installed from PyPI there.
    system_site_packages: bool = False

    def venv_command(self) -> str:
        flag = " --system-site-packages" if self.system_site_packages else ""
        return f"python3 -m venv{flag} {VENV}"

    def pip_command(self, bundle: str, wheel: str) -> str:
        also = f" {self.also}" if self.also else ""
        return f"{VENV}/bin/pip install -c {bundle}/constraints.txt '{bundle}/{wheel}[{self.extra}]'{also}"


# JetPack 6 is CUDA 12 and JetPack 7 CUDA 13; on x86_64 the driver's CUDA major decides (`nvidia-smi`
# shows it; 13.x needs driver 580 or newer). cuda-python must match it (pyproject.toml says why).
DEVICES = (
    DeviceInstall("Jetson, JetPack 6.x (6.0, 6.1, 6.2)", "Ubuntu 22.04, Python 3.10", "12.x", "10.3 (JetPack)",
                  "tensorrt-cu12", system_site_packages=True),
    DeviceInstall("Jetson, JetPack 7.0, 7.1", "Ubuntu 24.04, Python 3.12", "13.x", "10.13 (JetPack)",
                  "tensorrt-cu13", system_site_packages=True),
    DeviceInstall("Jetson, JetPack 7.2", "Ubuntu 24.04, Python 3.12", "13.x", "10.16 (JetPack)",
                  "tensorrt-cu13", system_site_packages=True),
    DeviceInstall("x86_64 GPU, driver with CUDA 12 (525 to 575)", "Linux, Python 3.10+", "12.x", "10.16 (PyPI)",
                  "tensorrt-cu12", also="'tensorrt-cu12==10.16.*'"),
    DeviceInstall("x86_64 GPU, driver with CUDA 13 (580 and newer)", "Linux, Python 3.10+", "13.x", "11.4 (PyPI)",
                  "tensorrt-cu13", also="'tensorrt-cu13==11.4.*'"),
    DeviceInstall("CPU, ONNX Runtime", "Linux, Python 3.10+", "-", "-", "onnxruntime"),
    DeviceInstall("CPU, OpenVINO", "Linux, Python 3.10+", "-", "-", "openvino"),
)


def install_table(bundle: str, wheel: str) -> str:
    """The Markdown table of `DEVICES` for a bundle directory named `bundle` holding `wheel`."""
    lines = ["| device | OS / Python | CUDA | TensorRT | venv, then install (on the device, beside the bundle) |",
             "|---|---|---|---|---|"]
    for row in DEVICES:
        lines.append(f"| {row.device} | {row.system} | {row.cuda} | {row.tensorrt} | "
                     f"`{row.venv_command()}` then `{row.pip_command(bundle, wheel)}` |")
    return "\n".join(lines)


# The device steps both READMEs show, for the first row (JetPack 6); other devices change the two
# install lines as the table says.
FIRST = DEVICES[0]


def device_commands(bundle: str, wheel: str) -> str:
    """The commands, in order, that build, check and run an engine on a device holding only the bundle."""
    return "\n".join([
        f"tar -xzf {bundle}.tar.gz",
        f"{FIRST.venv_command()}   # x86_64 and CPU: without --system-site-packages",
        f"{FIRST.pip_command(bundle, wheel)}   # JetPack 6.x; your device's line: the table below",
        f"{VENV}/bin/mtlora-export build --from-bundle {bundle} --backend tensorrt --precision fp16 --out build",
        f"{VENV}/bin/mtlora-export run build/engines/tensorrt-fp16 --image photo.jpg --out prediction.npz",
    ])
