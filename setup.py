"""detailflow_jax: DetailFlow (arXiv 2505.21473) in JAX/Flax Linen."""

import setuptools

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "numpy",
    "pillow>=10.1",  # ImageFont.load_default(size=...) for the picture labels
    "tqdm",
    "safetensors",
    "tensorboardX",
]

setuptools.setup(
    name="detailflow_jax",
    version="0.1.0",
    description="DetailFlow coarse-to-fine 1D tokenizer and group-parallel GPT in JAX/Flax",
    packages=setuptools.find_packages(include=["detailflow_jax", "detailflow_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        # The tests run the cloud storage ones against a local emulator (tests/test_gcs.py).
        "dev": ["pytest", "pytest-xdist", "chex", "gcsfs", "gcp-storage-emulator", "ruff==0.17.6"],
        # Work directories, codes and weights on gs:// buckets (etils.epath reads them through
        # gcsfs).
        "gcs": ["gcsfs"],
        # Reading official `.pt` checkpoints; `.npz`/`.safetensors` need no torch.
        "torch": ["torch"],
        # Ahead-of-time compiles for TPU topologies on any machine (python -m
        # detailflow_jax.preflight).
        "tpu-aot": ["libtpu==0.0.42.*"],
    },
)
