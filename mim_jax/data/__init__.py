"""Data: random-access sources, host-side transforms and grain loaders."""

from mim_jax.data.pipeline import Loader
from mim_jax.data.pipeline import make_eval_loader
from mim_jax.data.pipeline import make_train_loader
from mim_jax.data.pipeline import TrainLoader
from mim_jax.data.pipeline import UnreadableDataError
from mim_jax.data.sources import build_source
from mim_jax.data.sources import EmbeddedPhotosSource
from mim_jax.data.sources import ImageDecodeError
from mim_jax.data.sources import ImageFolderSource
from mim_jax.data.sources import NpzSource
from mim_jax.data.sources import TfdsSource
from mim_jax.data.sources import validate_data_config
from mim_jax.data.transforms import CLIP_MEAN
from mim_jax.data.transforms import CLIP_STD
from mim_jax.data.transforms import EvalTransform
from mim_jax.data.transforms import IMAGENET_MEAN
from mim_jax.data.transforms import IMAGENET_STD
from mim_jax.data.transforms import INCEPTION_MEAN
from mim_jax.data.transforms import INCEPTION_STD
from mim_jax.data.transforms import normalize
from mim_jax.data.transforms import TwoViewTransform
