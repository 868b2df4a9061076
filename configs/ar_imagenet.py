r"""The official DetailFlow AR recipe on ImageNet-1k (docs/recipes.md): GPT-L, ten-crop codes, 300
epochs.

    python -m detailflow_jax.tokenizer.extract --config configs/ar_imagenet.py:N=128 --tokenizer /ckpt/df16 \
        --tokenizer_config configs/tokenizer.py:DF-16 --out /data/codes/df16 --config.extract.data.data_dir=/data/tfds
    python -m detailflow_jax.train.ar --config configs/ar_imagenet.py:N=128 --workdir /ckpt/ar_df16 \
        --config.codes_dir=/data/codes/df16 --config.mesh.fsdp=8

Argument keys: N (128 / 256 / 512 = DetailFlow-16 / 32 / 64), gpt (the configs/gpt.py variant name,
default L), batch (global batch; the yaml's 256, the README recommends 512 for N = 128 / 256).
"""  # noqa: E501

from configs import common
from configs import gpt as gpt_configs
from detailflow_jax import config_lib
from detailflow_jax.data.pipeline import default_data_config


def get_config(arg: str | None = None):
    arg = config_lib.parse_arg(arg, N=128, gpt="L", batch=256)
    config_lib.require(
        arg.N in (128, 256, 512), "N", arg.N, "the released tokenizers have N = 128, 256 or 512"
    )
    gpt = gpt_configs.get_config(f"{arg.gpt}/{arg.N},dtype=bfloat16")
    data = default_data_config(name="imagefolder", image_size=256, eval_crop="ten_crop")
    c = common.ar_training(gpt, data, views="ten_crop")
    c.batch_size = arg.batch
    c.checkpoint_every = c.sample_every = 2 * (1_281_167 // arg.batch)
    c.sample_classes = (207, 360, 387, 974, 88, 979, 417, 279)  # the LlamaGen demo classes
    c.samples_per_class = 4
    return c
