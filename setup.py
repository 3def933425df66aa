from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("qkernels/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)


def _torchvision_for_installed_torch() -> str:
    """torchvision is built against one torch minor release (torch 2.N <-> torchvision 0.(N+15));
    a mismatched pair breaks at import, so pin the one matching the torch already installed."""
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("torch").split("+")[0].split(".")[:2])
    except Exception:
        return "torchvision"
    return f"torchvision=={major - 2}.{minor + 15}.*" if major == 2 else "torchvision"


_DIFFUSERS = ["diffusers>=0.37", "transformers>=5.20", "accelerate>=1.0", "peft>=0.18", "pillow"]
_SERVER = ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "websockets>=12", *_DIFFUSERS]

setup(
    name="qkernels",
    version=version["__version__"],
    description="8-bit (int8 / fp8) Linear layers with pluggable kernels for large diffusion transformers",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["qkernels*", "qpipeline*", "calibration*", "benchmarks*"]),
    # A range, not a pin: a machine's own CUDA torch is kept. 2.6 is the oldest the CPU suite was run
    # with (the Triton backends need 2.8's Triton 3.4; torch-native ones run on 2.6). The Makefile installs the CPU
    # build (torch==2.13.0) first on machines without a GPU, so this never pulls CUDA there.
    # huggingface_hub splits checkpoints into shards as save_pretrained does; accelerate builds
    # skeletons on the meta device (init_empty_weights)
    install_requires=["torch>=2.6", "numpy", "safetensors>=0.4", "tqdm", "huggingface_hub>=0.25", "accelerate>=1.0"],
    extras_require={
        "triton": ["triton>=3.4"],
        # CuPy's build must match the driver's CUDA major version: cupy-cuda12x or cupy-cuda13x.
        "cublaslt": ["cupy-cuda12x"],
        "cublaslt-cu13": ["cupy-cuda13x"],
        # into an existing diffusers environment: pip install -e ".[diffusers]"
        "diffusers": _DIFFUSERS,
        # the Qwen-Image-Edit engine: transformers' Qwen2-VL processor imports torchvision
        "engine": [*_DIFFUSERS, _torchvision_for_installed_torch()],
        "peers": ["torchao", "bitsandbytes"],
        # python -m qpipeline.serve; python-multipart: the endpoints' file uploads; websockets:
        # uvicorn's implementation of WS /stream
        "server": _SERVER,
        # python -m qpipeline.serve --ray: the edit app on Ray Serve replicas. 2.60 (the version tested) has
        # BackpressureConfig, which makes a full queue answer 429 instead of Ray's default 503
        "ray": ["ray[serve]>=2.60", *_SERVER],
        # httpx: the server tests' client; websockets: the stream tests' client (and the server's);
        # selenium: the page's test (drives Debian's chromium-driver)
        "dev": ["pytest", "triton>=3.4", "matplotlib", *_SERVER, "httpx", "selenium>=4.10", "ray[serve]>=2.60"],
    },
    package_data={"qpipeline": ["static/*.html"]},
    entry_points={"console_scripts": ["qkernels-quantize=qpipeline.quantize:main",
                                      "qpipeline-serve=qpipeline.serve:main",
                                      "qpipeline-worker=qpipeline.worker:main"]},
)
