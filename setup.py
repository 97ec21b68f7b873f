from setuptools import find_packages, setup

setup(
    name="ftkernels",
    version="0.1.0",
    description="Triton kernels for the frame transformer (multichannel linear, frame norm, "
    "squared-ReLU feed-forward, multichannel attention) and the frame-transformer separation model",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ftkernels", "ftkernels.*", "frame_transformer", "frame_transformer.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
    ],
    extras_require={
        "audio": ["soundfile>=0.12", "tqdm>=4.60", "matplotlib>=3.6", "scipy>=1.10"],
        "eval": ["soundfile>=0.12", "tqdm>=4.60", "matplotlib>=3.6", "scipy>=1.10", "museval>=0.4.1,<0.5"],
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4", "rotary-embedding-torch>=0.5",
                 "soundfile>=0.12", "tqdm>=4.60", "matplotlib>=3.6", "scipy>=1.10", "museval>=0.4.1,<0.5"],
    },
    entry_points={
        "console_scripts": [
            "frame-transformer-train = frame_transformer.train:main",
            "frame-transformer-separate = frame_transformer.separate:main",
            "frame-transformer-evaluate = frame_transformer.evaluate:main",
            "frame-transformer-convert = frame_transformer.convert:main",
        ],
    },
)
