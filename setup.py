from setuptools import find_packages, setup

setup(
    name="compress",
    version="0.1.0",
    description="Make CNNs small and fast for edge devices: channel search, pruning, export, latency checks.",
    packages=find_packages(include=["compress", "compress.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "torchvision>=0.19", "torch-pruning>=1.5", "thop", "numpy", "PyYAML",
        "pydantic>=2", "tqdm", "onnx", "onnxscript", "onnxruntime", "ai-edge-litert",
        # the TFLite converter: its litert-converter ships no Linux aarch64 wheels (ONNX export works there)
        "litert-torch; platform_system != 'Linux' or platform_machine != 'aarch64'",
        "matplotlib", "torchmetrics", "pycocotools", "scipy",
    ],
    extras_require={"dev": ["pytest>=7", "pytest-timeout", "pytest-xdist", "tensorboard", "timm"],
                    "timm": ["timm"],  # timm:NAME model sources
                    # the peers benchmarks/bench_pretrained.py compares with (modelopt 0.47 needs
                    # torchprofile's 0.0.x API)
                    "benchmark": ["nvidia-modelopt==0.47.0", "torchprofile==0.0.4"]},
    entry_points={"console_scripts": ["chansearch=compress.app.cli:main"]},
)
