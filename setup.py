"""mim_jax: masked-image-modeling pre-training of Vision Transformers in JAX/Flax."""

import setuptools

# Versions pinned together: they install side by side and `pip check` is clean
# (see README "Installation"). Bump them together, never one alone.
INSTALL_REQUIRES = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "grain==0.2.18",
  "tensorflow-datasets==4.9.10",
  "array-record==0.8.6",
  "ml-collections==1.1.0",
  "clu==0.0.12",
  # clu's metric writers import TensorFlow without declaring it.
  "tensorflow-cpu==2.21.0",
  "tensorboard==2.21.0",
  "scikit-learn==1.9.1",
  "numpy==2.4.6",
  "pillow==13.0.0",
  "absl-py",
  "matplotlib",
  # Weights out (`python -m mim_jax.export`): the format timm and the Hugging Face Hub read.
  "safetensors==0.8.0",
]

EXTRAS = {
  # Parity references. torch==2.13.0 resolves to the CPU wheel on this
  # machine's local wheel cache; never let a CUDA build be pulled.
  "test": [
    "pytest",
    "pytest-xdist==3.8.0",  # `make test` runs the suite on up to 4 worker processes
    "pytest-timeout==2.4.0",  # a hung test fails alone (pytest.ini), not the whole CI run
    "ruff==0.17.6",  # `make lint`; its settings are in ruff.toml
    "torch==2.13.0",
    "torchvision==0.28.0",
    "timm==1.0.31",
    "open_clip_torch==3.3.0",
    "faiss-cpu==1.15.1",
    # The notebooks in colabs/ run in the suite (tests/test_notebooks.py).
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
  ],
  # Compile-only TPU targets (`python -m mim_jax.aot`, docs/aot.md): jax 0.10.2's own `tpu`
  # extra pins libtpu 0.0.42.*; bump the two together. ~700 MB, Google Cloud Platform Terms
  # of Service: optional, never vendored. On a machine without TPU chips mim_jax keeps jax
  # on the CPU (mim_jax/__init__.py), so installing it changes no ordinary run.
  "tpu": ["libtpu==0.0.42.1"],
  # Compile-only GPU targets (h100-8, ...: docs/aot.md): jax's CUDA plugin and its PJRT
  # library, pinned to jaxlib's version (bump together); ~180 MB, no NVIDIA libraries (those
  # are its `with-cuda` extra, never wanted here). Without a GPU, `import mim_jax` hides it from
  # jax (mim_jax/__init__.py), so installing it changes no ordinary run.
  "gpu-aot": ["jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"],
}

setuptools.setup(
  name="mim_jax",
  version="0.1.0",
  description=(
    "Masked-image-modeling pre-training of ViTs (BEiT v2, PeCo, MaPeT, CCViT, CAE v2) in JAX/Flax."
  ),
  packages=setuptools.find_packages(include=["mim_jax", "mim_jax.*"]),
  package_data={"mim_jax": ["gpu_targets/*.txtpb"]},  # what XLA:GPU is told each GPU is
  python_requires=">=3.11",
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS,
)
