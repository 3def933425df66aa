from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("qkernels/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="qkernels",
    version=version["__version__"],
    description="8-bit (int8 / fp8) Linear layers with pluggable kernels for large diffusion transformers",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["qkernels*", "qpipeline*", "calibration*", "benchmarks*"]),
    # A range, not a pin: a machine's own CUDA torch is kept. The Makefile installs the CPU
    # build (torch==2.13.0) first on machines without a GPU, so this never pulls CUDA there.
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        # CuPy's build must match the driver's CUDA major version: cupy-cuda12x or cupy-cuda13x.
        "cublaslt": ["cupy-cuda12x"],
        "cublaslt-cu13": ["cupy-cuda13x"],
        "diffusers": ["diffusers>=0.35", "transformers>=4.51", "pillow"],
        "peers": ["torchao", "bitsandbytes"],
        # python -m qpipeline.serve; python-multipart: the endpoints' file uploads
        "server": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "diffusers>=0.35",
                   "transformers>=4.51", "pillow"],
        # python -m qpipeline.serve --ray: the edit app on Ray Serve replicas. 2.60 (the version tested) has
        # BackpressureConfig, which makes a full queue answer 429 instead of Ray's default 503
        "ray": ["ray[serve]>=2.60", "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9",
                "diffusers>=0.35", "transformers>=4.51", "pillow"],
        # httpx: the server tests' client; selenium: the page's test (drives Debian's chromium-driver)
        "dev": ["pytest", "triton>=3.0", "diffusers>=0.35", "transformers>=4.51", "pillow", "matplotlib",
                "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "httpx", "selenium>=4.10",
                "ray[serve]>=2.60"],
    },
    package_data={"qpipeline": ["static/*.html"]},
    entry_points={"console_scripts": ["qkernels-quantize=qpipeline.quantize:main",
                                      "qpipeline-serve=qpipeline.serve:main",
                                      "qpipeline-worker=qpipeline.worker:main"]},
)
